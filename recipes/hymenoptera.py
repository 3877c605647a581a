#!/usr/bin/env python
"""Ants vs bees, the data of the PyTorch transfer-learning tutorial: a fixed feature
extractor vs fine-tuning the whole network (the two halves of the tutorial).

Data: a folder with train/{ants,bees} and val/{ants,bees} (default: $TRANSFERKIT_DATA/hymenoptera).
Runs are defined in recipes/hymenoptera.yaml; see docs/recipes/hymenoptera.md.
"""

from pathlib import Path

from transferkit.errors import DataError
from transferkit.recipes import RecipeData, image_folder_splits, recipe_main, run_recipe


def data(root: Path, options: dict) -> RecipeData:
    splits = image_folder_splits(root)
    if splits is None:
        raise DataError(f"{root} has no train/ folder. The tutorial's data: download hymenoptera_data.zip from the "
                        "PyTorch tutorial and pass --data-dir to the unzipped folder.")
    return splits


if __name__ == "__main__":
    recipe_main(lambda: run_recipe("hymenoptera", data, description=__doc__,
                                   recipe_dir=Path(__file__).resolve().parent,
                                   get_data="Download hymenoptera_data.zip from the PyTorch transfer-learning "
                                            "tutorial, unzip it and pass --data-dir to the unzipped folder."))
