#!/usr/bin/env python
"""CIFAR-10 (10 classes, 32x32): linear probe vs fine-tuning of an ImageNet ResNet-50.

Data: --data-dir with train/ and val/ or test/ class folders, or the torchvision data set
CIFAR10 stored there (pass --download to fetch it when online). See docs/recipes/cifar10.md.
"""

from pathlib import Path

from transferkit.recipes import recipe_main, run_recipe, torchvision_data

data = torchvision_data("CIFAR10", {"train": True}, {"train": False})

if __name__ == "__main__":
    recipe_main(lambda: run_recipe("cifar10", data, description=__doc__,
                                   recipe_dir=Path(__file__).resolve().parent))
