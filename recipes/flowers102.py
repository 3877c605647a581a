#!/usr/bin/env python
"""Oxford Flowers-102 (102 classes, 10 training images each): linear probe vs fine-tuning.

Data: --data-dir with train/ and val/ or test/ class folders, or the torchvision data set
Flowers102 stored there (pass --download to fetch it when online). See docs/recipes/flowers102.md.
"""

import sys
from pathlib import Path

from transferkit.recipes import main_guard, run_recipe, torchvision_data

data = torchvision_data("Flowers102", {"split": "train"}, {"split": "test"}, val_kwargs={"split": "val"})

if __name__ == "__main__":
    sys.exit(main_guard(lambda: run_recipe("flowers102", data, description=__doc__,
                                           recipe_dir=Path(__file__).resolve().parent)))
