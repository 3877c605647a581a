#!/usr/bin/env python
"""CIFAR-100 (100 classes, 32x32): linear probe vs fine-tuning of an ImageNet ResNet-50.

Data: --data-dir with train/ and val/ or test/ class folders, or the torchvision data set
CIFAR100 stored there (pass --download to fetch it when online). See docs/recipes/cifar100.md.
"""

from pathlib import Path

from transferkit.recipes import recipe_main, run_recipe, torchvision_data

data = torchvision_data("CIFAR100", {"train": True}, {"train": False})

if __name__ == "__main__":
    recipe_main(lambda: run_recipe("cifar100", data, description=__doc__,
                                   recipe_dir=Path(__file__).resolve().parent))
