"""Which reader a ``data=`` value needs: tar shards, Parquet files, a Hugging Face dataset,
or none of them (a folder of images, a CSV, a torch Dataset: see `transferkit.data.prepare_data`).

The rule, in order: a Hugging Face ``datasets`` object or ``save_to_disk`` folder; tar
shards (a path or brace pattern ending in ``.tar``, a folder holding ``.tar`` files, a list
of them); Parquet files (the same, with ``.parquet``). Remote tar shards (``pipe:``
commands, ``http(s)://`` and other fsspec URLs, as a brace pattern or a list) are fetched
into a bounded local shard cache and read from there (`transferkit.data.remote`); other
remote data (a remote Parquet file, a URL that names no ``.tar``) are refused with a clear
error: copy them to a local disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transferkit._text import hide_secrets
from transferkit.data.checks import DataReport
from transferkit.data.encoded import EncodedImageDataset
from transferkit.data.shards import is_remote, open_shards, shard_list, split_shard_folder
from transferkit.data.tables import is_hf_dataset, is_saved_hf, open_hf, open_parquet, parquet_list, \
    split_hf, split_parquet_files
from transferkit.errors import DataError


def is_encoded_input(data: Any) -> bool:
    """Whether ``data`` names shards, Parquet files or a Hugging Face dataset (reads no sample)."""
    if isinstance(data, EncodedImageDataset) or is_hf_dataset(data) or is_saved_hf(data):
        return True
    if is_remote(data):
        return True
    return shard_list(data) is not None or parquet_list(data) is not None


def split_encoded(data: Any, *, need_train: bool = True, report: DataReport | None = None) -> tuple[Any, Any] | None:
    """``(train, validation)`` of an input that holds both: a folder of ``train*.tar`` and
    ``val*.tar`` shards, Parquet files named by split, a ``DatasetDict``; else None.
    ``need_train=False``: a ``DatasetDict`` without a train split gives its validation one.
    ``report``: told of a folder's shards that are not used (`split_shard_folder`)."""
    if is_hf_dataset(data) or is_saved_hf(data):
        return split_hf(data, need_train=need_train)
    if isinstance(data, (str, Path)) and Path(data).is_dir():
        shards = split_shard_folder(data, report)
        if shards is not None:
            return shards
        files = parquet_list(data)
        if files:
            return split_parquet_files(files, report)
    return None


def shared_shards(data: Any, val_data: Any) -> list[str]:
    """The local tar shards that both ``data`` and ``val_data`` name (the same file, however
    spelled), by name; empty when either names no local shards."""
    def files(x: Any) -> dict[str, str]:
        try:
            shards = shard_list(x) or []
        except DataError:  # a missing or refused shard is reported when the data are opened
            return {}
        return {os.path.realpath(s): s for s in shards if not is_remote(s)}
    train, val = files(data), files(val_data)
    return sorted(val[k] for k in train.keys() & val.keys())


def open_encoded(data: Any, *, classes: list[str] | None, min_size: int | None, on_bad_file: str, scan: str,
                 cache_dir: Any, report: DataReport, what: str) -> EncodedImageDataset | None:
    """The dataset for ``data`` when it is an encoded input (see the module docstring), else None."""
    if isinstance(data, EncodedImageDataset):
        report.merge(data.report)
        if classes and list(classes) != data.classes:
            raise DataError(f"The {what} dataset's classes {data.classes[:10]} differ from the training classes "
                            f"{list(classes)[:10]}.")
        return EncodedImageDataset(data.source, data.all_targets, data.classes, indices=data.indices,
                                   min_size=data.min_size if min_size is None else min_size,
                                   on_bad_file=on_bad_file, report=report)
    common = {"classes": classes, "min_size": min_size, "on_bad_file": on_bad_file, "report": report, "what": what}
    if is_hf_dataset(data) or is_saved_hf(data):
        return open_hf(data, scan=scan, cache_dir=cache_dir, **common)
    shards = shard_list(data)
    if shards is not None:
        return open_shards(shards, scan=scan, cache_dir=cache_dir, **common)
    if is_remote(data):
        shown = hide_secrets(str(data))[:60]
        raise DataError(f"Remote data ({shown!r}) are read only as tar shards (a URL or pipe: command per "
                        ".tar file, or a brace pattern of them); copy other remote files to a local disk. A tar "
                        "shard served under another name is read by a command: pipe:curl -s '<URL>'.")
    files = parquet_list(data)
    if files is not None:
        return open_parquet(files, scan=scan, cache_dir=cache_dir, **common)
    return None
