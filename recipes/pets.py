#!/usr/bin/env python
"""Oxford-IIIT Pets (37 breeds): linear probe vs fine-tuning.

Data: --data-dir with train/ and val/ or test/ class folders, or the torchvision data set
OxfordIIITPet stored there (pass --download to fetch it when online). See docs/recipes/pets.md.
"""

from pathlib import Path

from transferkit.recipes import recipe_main, run_recipe, torchvision_data

data = torchvision_data("OxfordIIITPet", {"split": "trainval", "target_types": "category"}, {"split": "test", "target_types": "category"})

if __name__ == "__main__":
    recipe_main(lambda: run_recipe("pets", data, description=__doc__,
                                   recipe_dir=Path(__file__).resolve().parent))
