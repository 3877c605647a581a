#!/usr/bin/env python
"""MNIST, the classic comparison: a 784-500-300-10 feed-forward network and a CNN trained from scratch, beside transfer from CIFAR-10 ResNet-20 weights.

Data: --data-dir with train/ and val/ or test/ class folders, or the torchvision data set
MNIST stored there (pass --download to fetch it when online). See docs/recipes/mnist.md.
"""

from pathlib import Path

from transferkit.recipes import recipe_main, run_recipe, torchvision_data

data = torchvision_data("MNIST", {"train": True}, {"train": False})

if __name__ == "__main__":
    recipe_main(lambda: run_recipe("mnist", data, description=__doc__,
                                   recipe_dir=Path(__file__).resolve().parent))
