"""Worker for tests/test_train_ddp.py, launched by ``torchrun --nproc_per_node=2`` (gloo, CPU).

Usage: ``torchrun --nproc_per_node=2 tests/ddp_worker.py <image folder> <out dir> [mode]``.

``train`` (default): each rank runs three finetune() calls and saves its results to
``<out>/<name>_rank<r>.pt``: ``cached`` (frozen backbone, cached features, head under DDP),
``gradual`` (images every epoch, gradual unfreezing: one more block per epoch, the DDP
wrapper rebuilt at each unfreeze) and ``dropout`` (the first dropout mask each rank draws).
Then ``features_rank<r>.pt``: compute_features sharded over the ranks (augmented views, in
memory and through a shared ``cache_dir``); ``device_features_rank<r>.pt``: the same with the
images decoded by `DeviceDecodedLoader` (torchvision's CPU decoder standing in for nvJPEG),
each rank decoding its own share. Last, ``load_failures_rank<r>.pt``: the data report of a run
over a copy of the folder whose `BAD_FILES` fail only when loaded (``scan="none"``), each
rank loading its own share of them, with the validation metrics of a run whose validation
folder holds `BAD_VAL_FILES`; ``decoded_rank<r>.pt``: which rank decoded the images of
a run that decodes them once into a shared ``cache_dir``.

``fail``: rank 1's epoch-end callback raises ``ValueError("boom from rank 1")`` and the
process then lingers for 600 s instead of exiting (as a process stuck in its own cleanup
would); rank 0 must end by itself with that error.

``remote``: ``<image folder>`` is a URL pattern of remote tar shards; each rank runs one
finetune() over them (images every epoch, a ``cache_dir`` shared by the ranks) and saves
``remote_rank<r>.pt``.

``slow_decode``: run under a short ``TRANSFERKIT_DIST_TIMEOUT``, rank 0 decodes the images
once into ``cache_dir`` for longer than that while rank 1 waits (``slow_decode_rank<r>.pt``).

``stall``: rank 1's callback sleeps for 600 s without failing; with a short
``TRANSFERKIT_DIST_TIMEOUT`` rank 0's next collective times out and both ranks end.

``before_joining``: rank 1's call is refused (epochs=-1) before it joins the process group;
torchrun then ends rank 0, which waits to join, with SIGTERM.

``sigterm``: every rank sends itself SIGTERM at the end of epoch 1 (as a scheduler ending the
job does), with no checkpoint; each rank prints its interruption message to stdout.

``other_data``: rank 1 reads the folder ``$RANK1_DATA`` instead (a copy with one image
less); ``bad_export``: the export path is a folder, which rank 0 finds before training. In
both, the failing rank then lingers as in ``fail``, and the other must end by itself with
its error. ``export_fails_late``: rank 0's outputs fail after training and it exits while
rank 1 waits at the barrier after them.
"""

import dataclasses
import os
import signal
import sys
import time
import traceback
import warnings

import torch

import transferkit as tk
from transferkit.backbones import get_backbone
from transferkit.data import eval_transform, prepare_data, train_transform
from transferkit.train.distributed import dist_info, exit_cleanly
from transferkit.train.features import compute_features

RANK = int(os.environ.get("RANK", "0"))


def common(data: str) -> dict:
    return dict(weights=None, data=data, image_size=32, device="cpu", num_workers=0, seed=0, verbose=False)


def first_dropout_mask() -> tuple[dict, object]:
    """A global forward hook that keeps the first training-mode dropout call's input and output."""
    seen: dict = {}

    def hook(module, args, output):
        if isinstance(module, torch.nn.Dropout) and module.training and "mask" not in seen:
            seen["mask"] = torch.stack([args[0] != 0, output == 0])  # [kept-able, zero out]

    return seen, torch.nn.modules.module.register_module_forward_hook(hook)


def eval_images_seen() -> tuple[dict, object]:
    """A global forward hook counting the images a TransferModel sees in eval mode (validation)."""
    seen = {"n": 0}

    def hook(module, args, output):
        if isinstance(module, tk.TransferModel) and not module.training:
            seen["n"] += args[0].shape[0]

    return seen, torch.nn.modules.module.register_module_forward_hook(hook)


def whole_validation(r) -> dict:
    """The trained model's validation logits and loss from one process over the whole set."""
    from transferkit.train.loaders import make_loader
    from transferkit.train.loop import evaluate

    val = r.run.bundle.val.view(transform=eval_transform(r.decisions.input_spec))
    loader = make_loader(val, batch_size=4, shuffle=False, device=torch.device("cpu"), num_workers=0)
    ev = evaluate(r.model, loader, loss_fn=r.run.loss_fn, device=torch.device("cpu"), speed=r.run.speed)
    return {"whole_logits": ev["logits"], "whole_loss": ev["loss"], "n_val": len(val)}


def whole_sets() -> dict:
    """Each rank's share of 5 rows (their indices), dealt by a validation sampler round-robin
    and, with sample groups, in blocks, gathered whole by `whole_set`."""
    from transferkit.data.sampling import EpochSampler
    from transferkit.train.distributed import whole_set

    info, out = dist_info(), {}
    for name, groups in (("round_robin", None), ("grouped", [0, 0, 1, 1, 1])):
        s = EpochSampler(5, shuffle=False, rank=info.rank, world_size=info.world_size, pad=False, groups=groups)
        mine = torch.tensor([i for i, _ in s], dtype=torch.float32)
        out[name] = whole_set(mine, 5, info, [s.indices_of(r) for r in range(info.world_size)])
    return out


def feature_setup(data: str) -> tuple[torch.nn.Module, object]:
    """A seeded small_cnn and the training images with random augmentation (also used by the test)."""
    torch.manual_seed(0)
    bb = get_backbone("tk:small_cnn", weights=None)
    spec = dataclasses.replace(bb.input_spec, image_size=32, resize_size=None)
    bundle = prepare_data(data, None, val_split=0.2, seed=0)
    ds = bundle.train.view(transform=train_transform(spec, "standard"))
    odd = len(ds) // 2 * 2 - 1  # an odd count: the last shard is padded
    return tk.build_model(bb, 2, spec=spec), torch.utils.data.Subset(ds, range(odd))


def sharded_features(data: str, out: str) -> None:
    """The training set's features (2 augmented views) computed with the shards of both ranks."""
    torch.manual_seed(0)
    model, ds = feature_setup(data)
    args = dict(key="k", views=2, batch_size=4, device=torch.device("cpu"), num_workers=0, seed=3, info=dist_info())
    mem = compute_features(model, ds, **args)
    disk = compute_features(model, ds, cache_dir=os.path.join(out, "cache"), **args)
    again = compute_features(model, ds, cache_dir=os.path.join(out, "cache"), **args)
    torch.save({"n": len(ds), "memory": torch.from_numpy(mem.features.copy()), "targets": torch.from_numpy(mem.targets),
                "disk": torch.from_numpy(disk.features.copy()), "disk_reused": disk.reused,
                "again_reused": again.reused}, os.path.join(out, f"features_rank{RANK}.pt"))


def device_setup(data: str) -> tuple[torch.nn.Module, object, object]:
    """A seeded small_cnn, its input spec and an odd number of training images (as files)."""
    torch.manual_seed(0)
    bb = get_backbone("tk:small_cnn", weights=None)
    spec = dataclasses.replace(bb.input_spec, image_size=32, resize_size=None)
    bundle = prepare_data(data, None, val_split=0.2, seed=0)
    odd = len(bundle.train) // 2 * 2 - 1  # an odd count: the last shard is padded
    return tk.build_model(bb, 2, spec=spec), spec, bundle.train.view(indices=range(odd))


def device_decoded_features(data: str, out: str, info=None) -> dict:
    """The training files' features (2 augmented views) from images decoded by the device
    loader, each rank decoding its own share (the EpochSampler split), gathered."""
    from transferkit.data.gpu_jpeg import DeviceDecodedLoader

    info = info or dist_info()
    model, spec, ds = device_setup(data)
    loader = DeviceDecodedLoader(ds, spec, augment="standard", batch_size=4, device=torch.device("cpu"), seed=3,
                                 num_workers=0, rank=info.rank, world_size=info.world_size)
    store = compute_features(model, ds, key="k", views=2, batch_size=4, device=torch.device("cpu"), num_workers=0,
                             seed=3, info=info, loader=loader)
    return {"n": len(ds), "features": torch.from_numpy(store.features.copy()),
            "targets": torch.from_numpy(store.targets)}


def train(data: str, out: str) -> None:
    r = tk.finetune("tk:small_cnn", policy="feature_extraction", epochs=3, batch_size=4, lr=0.05, optimizer="sgd",
                    restore_best=False, **common(data))
    torch.save({"state": r.model.state_dict(), "history": r.history}, os.path.join(out, f"cached_rank{RANK}.pt"))
    validated, handle = eval_images_seen()
    r = tk.finetune("tk:small_cnn", policy="gradual:every=1", epochs=3, batch_size=4, lr=0.01, restore_best=False,
                    checkpoint=os.path.join(out, "gradual.pt"), **common(data))
    handle.remove()
    torch.save({"state": r.model.state_dict(), "history": r.history, "validated": validated["n"],
                "val_logits": r.val_logits, "val_loss": r.metrics["val_loss"], **whole_validation(r)},
               os.path.join(out, f"gradual_rank{RANK}.pt"))
    seen, handle = first_dropout_mask()
    r = tk.finetune("tk:small_cnn", policy="feature_extraction", epochs=1, batch_size=4, head_hidden=[64],
                    head_dropout=0.5, **common(data))
    handle.remove()
    torch.save({"mask": seen["mask"], "state": r.model.state_dict()}, os.path.join(out, f"dropout_rank{RANK}.pt"))
    sharded_features(data, out)
    torch.save(device_decoded_features(data, out), os.path.join(out, f"device_features_rank{RANK}.pt"))
    torch.save(whole_sets(), os.path.join(out, f"whole_sets_rank{RANK}.pt"))
    bad = with_bad_files(data, os.path.join(out, f"bad_files_rank{RANK}"))
    r = tk.finetune("tk:small_cnn", policy="full", epochs=1, batch_size=4, scan="none", decode_once=False,
                    val_split=0, **common(bad))
    val = with_bad_files(data, os.path.join(out, f"bad_val_rank{RANK}"), names=BAD_VAL_FILES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the validation files are copies of the training files
        v = tk.finetune("tk:small_cnn", policy="full", epochs=1, batch_size=4, scan="none", decode_once=False,
                        val_data=val, **common(data))
    torch.save({"bad_at_load": r.data_report.bad_at_load, "bad_files": r.data_report.bad_files,
                "lost_classes": r.data_report.lost_classes, "counted": sum(map(sum, v.metrics["confusion_matrix"])),
                "val_files": [str(source) for source, _ in v.run.bundle.val.samples],
                "val_bad_at_load": v.data_report.bad_at_load},
               os.path.join(out, f"load_failures_rank{RANK}.pt"))
    torch.save(decoded_once_on_disk(data, out), os.path.join(out, f"decoded_rank{RANK}.pt"))


def decoded_once_on_disk(data: str, out: str, slow_s: float = 0.0) -> dict:
    """How many parts (training, validation) this rank decoded in a run that decodes images once
    into a ``cache_dir`` shared by the ranks, and what it trained. ``slow_s``: the first decode
    takes that much longer (mode ``slow_decode`` runs with a shorter collective timeout)."""
    from transferkit.data import decoded

    calls = []
    real = decoded._decode_into

    def counted(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(slow_s)
        return real(*a, **k)

    decoded._decode_into = counted
    try:
        r = tk.finetune("tk:small_cnn", policy="full", epochs=2, batch_size=4, augment="flip", restore_best=False,
                        cache_dir=os.path.join(out, "decode_cache"), **common(data))
    finally:
        decoded._decode_into = real
    return {"decoded": len(calls), "modes": sorted(p["mode"] for p in r.decisions.decode.values()),
            "history": [h["train_loss"] for h in r.history]}


BAD_FILES = ("dark/dark_0.jpg", "dark/dark_5.png", "light/light_2.jpg", "light/light_9.png",
             "zebra/zebra_0.png", "zebra/zebra_1.png")  # zebra: a class of which no file loads


BAD_VAL_FILES = ("dark/dark_1.png", "dark/dark_6.jpg", "light/light_4.jpg")  # in a validation folder


def with_bad_files(data: str, copy: str, names: tuple[str, ...] = BAD_FILES) -> str:
    """A copy of the image folder (one per rank: the same relative paths and sizes) whose
    files ``names`` are not images; with scan='none' they fail only when a rank loads them."""
    import shutil

    shutil.copytree(data, copy)
    for name in names:
        os.makedirs(os.path.dirname(os.path.join(copy, name)), exist_ok=True)
        with open(os.path.join(copy, name), "wb") as f:
            f.write(b"not an image")
    return copy


def remote(data: str, out: str) -> None:
    r = tk.finetune("tk:small_cnn", policy="full", epochs=2, batch_size=4, lr=0.01, restore_best=False,
                    decode_once=False, augment="none", precision="fp32", classes=["dark", "light"],
                    cache_dir=os.path.join(out, "cache"), **common(data))
    torch.save({"state": r.model.state_dict(), "history": r.history}, os.path.join(out, f"remote_rank{RANK}.pt"))


LINGER_S = 600.0  # longer than the test's guard against a hang: the job must end rank 1 itself


def fail_or_stall(data: str, mode: str) -> None:
    def callback(row: dict) -> None:
        if RANK == 1 and row["epoch"] == 1:
            if mode == "fail":
                raise ValueError("boom from rank 1")
            time.sleep(LINGER_S)
            print("rank 1 woke from its stall", flush=True)  # the test checks the job never waits this long

    tk.finetune("tk:small_cnn", policy="feature_extraction", epochs=3, batch_size=4, callbacks=[callback],
                **common(data))


def terminated(data: str) -> None:
    def callback(row: dict) -> None:
        if row["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        tk.finetune("tk:small_cnn", policy="feature_extraction", epochs=3, batch_size=4, callbacks=[callback],
                    **common(data))
    except tk.TrainingInterrupted as exc:
        print(f"rank {RANK}: {exc} [{exc.checkpoint}]", flush=True)


def one_rank_refuses(data: str, out: str, mode: str) -> None:
    if mode == "other_data" and RANK == 1:
        data = os.environ["RANK1_DATA"]
    export = os.path.join(out, "folder.pt") if mode == "bad_export" else None
    if export is not None:
        os.makedirs(export, exist_ok=True)
    batch = 2 if mode == "other_settings" and RANK == 1 else 4  # another config on one node
    tk.finetune("tk:small_cnn", policy="feature_extraction", epochs=1, batch_size=batch, export=export, **common(data))


def export_fails_late(data: str, out: str) -> None:
    """Rank 0's outputs fail after training and it exits at once, while rank 1 waits for it at
    the barrier after them. Rank 0 exits with status 0 after printing its error: an exit with
    an error would have torchrun end rank 1 before it could say anything."""
    if RANK == 0:
        import transferkit.api as api

        def fails(*args, **kwargs):
            raise OSError("the disk went away")
        api.write_outputs = fails
    try:
        tk.finetune("tk:small_cnn", policy="feature_extraction", epochs=1, batch_size=4, **common(data))
    except OSError as exc:
        print(f"rank {RANK}: {type(exc).__name__}: {exc}", flush=True)
        os._exit(0)


def main() -> None:
    torch.set_num_threads(1)
    data, out = sys.argv[1], sys.argv[2]
    mode = sys.argv[3] if len(sys.argv) > 3 else "train"
    if mode == "train":
        train(data, out)
    elif mode == "remote":
        remote(data, out)
    elif mode == "slow_decode":
        torch.save(decoded_once_on_disk(data, out, slow_s=16.0), os.path.join(out, f"slow_decode_rank{RANK}.pt"))
    elif mode == "before_joining":
        tk.finetune("tk:small_cnn", epochs=1 if RANK == 0 else -1, **common(data))
    elif mode == "sigterm":
        terminated(data)
    elif mode in ("other_data", "other_settings", "bad_export"):
        one_rank_refuses(data, out, mode)
    elif mode == "export_fails_late":
        export_fails_late(data, out)
    else:
        fail_or_stall(data, mode)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        failing = {"fail": 1, "other_data": 1, "other_settings": 1, "bad_export": 0}.get(
            sys.argv[3] if len(sys.argv) > 3 else "")
        if RANK == failing:
            time.sleep(LINGER_S)  # a failed rank that does not exit: the other must end by itself
            print("rank 1 lingered to its end", flush=True)  # the test checks the job never waits this long
        exit_cleanly(1)
    exit_cleanly(0)
