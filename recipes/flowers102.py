#!/usr/bin/env python
"""Oxford Flowers-102 (102 classes, 10 training images each): linear probe vs fine-tuning.

Data: --data-dir with train/ and val/ or test/ class folders, or the torchvision data set
Flowers102 stored there (pass --download to fetch it when online). See docs/recipes/flowers102.md.
"""

from pathlib import Path

from transferkit.recipes import recipe_main, run_recipe, torchvision_data

data = torchvision_data("Flowers102", {"split": "train"}, {"split": "test"}, val_kwargs={"split": "val"})

if __name__ == "__main__":
    recipe_main(lambda: run_recipe("flowers102", data, description=__doc__,
                                   recipe_dir=Path(__file__).resolve().parent))
