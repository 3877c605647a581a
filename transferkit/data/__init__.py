"""Data: folders and datasets of images, splits, and transforms from the input spec."""

from __future__ import annotations

from transferkit.data.checks import DataReport, check_image_file, find_duplicates
from transferkit.data.folders import SplitFolders, find_split_folders, scan_csv
from transferkit.data.encoded import EncodedImageDataset
from transferkit.data.images import (
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    TransformedDataset,
    dataset_targets,
    load_image,
    scan_image_folder,
)
from transferkit.data.bundle import DataBundle, prepare_data, resolve_split_folders, stratified_split
from transferkit.data.tables import open_hf, open_parquet
from transferkit.data.transforms import eval_transform, train_transform

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataBundle",
    "DataReport",
    "EncodedImageDataset",
    "check_image_file",
    "find_duplicates",
    "ImageFolderDataset",
    "TransformedDataset",
    "dataset_targets",
    "eval_transform",
    "load_image",
    "open_hf",
    "open_parquet",
    "prepare_data",
    "resolve_split_folders",
    "SplitFolders",
    "find_split_folders",
    "scan_csv",
    "scan_image_folder",
    "stratified_split",
    "train_transform",
]
