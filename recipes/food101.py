#!/usr/bin/env python
"""Food-101 (101 dishes, 75,750 training images): linear probe vs fine-tuning.

Data: --data-dir with train/ and val/ or test/ class folders, or the torchvision data set
Food101 stored there (pass --download to fetch it when online). See docs/recipes/food101.md.
"""

from pathlib import Path

from transferkit.recipes import recipe_main, run_recipe, torchvision_data

data = torchvision_data("Food101", {"split": "train"}, {"split": "test"})

if __name__ == "__main__":
    recipe_main(lambda: run_recipe("food101", data, description=__doc__,
                                   recipe_dir=Path(__file__).resolve().parent))
