"""The offline demo: honest transfer on scikit-learn's handwritten digits.

1. Train ``tk:small_cnn`` from scratch on the *source* task, digits 0-4, and save a
   checkpoint file.
2. Transfer to the *target* task, digits 5-9, with only 10 labelled images per class:
   feature extraction and fine-tuning from the checkpoint (loaded through
   ``weights=<file>``, the path a user takes), beside the same network from scratch.
3. Export the best model to TorchScript, reload the file, predict, and print a table.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from transferkit._io import atomic_write, check_writable
from transferkit._signals import TrainingInterrupted, signal_name
from transferkit.api import finetune
from transferkit.backbones import InputSpec
from transferkit.checkpoints import run_in
from transferkit.data import eval_transform
from transferkit.errors import ConfigError
from transferkit.export import load

IMAGE_SIZE = 16


class DigitImages(Dataset):
    """Digits as 8x8 grayscale PIL images with labels ``0..len(classes)-1``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
        self.images = (images * (255.0 / 16.0)).round().astype(np.uint8)
        self.targets = [int(t) for t in labels]
        self.classes = classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return Image.fromarray(self.images[i], mode="L"), self.targets[i]


class Pretransformed(Dataset):
    """A dataset with every image decoded and resized once, kept as uint8 tensors."""

    def __init__(self, base: DigitImages, size: int) -> None:
        tf = eval_transform(InputSpec(image_size=size))
        self.items = torch.stack([tf(base[i][0]) for i in range(len(base))])
        self.targets, self.classes = base.targets, base.classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.items[i], self.targets[i]


def digit_tasks(labelled_per_class: int = 10, seed: int = 0) -> dict[str, DigitImages]:
    """Source (0-4, all images), target train (5-9, ``labelled_per_class`` each) and target test (the rest)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.images, digits.target
    src = y <= 4
    rng = np.random.default_rng(seed)
    tgt_idx = np.flatnonzero(~src)
    train_idx = np.concatenate([rng.choice(tgt_idx[y[tgt_idx] == d], labelled_per_class, replace=False)
                                for d in range(5, 10)])
    test_idx = np.setdiff1d(tgt_idx, train_idx)
    names_src, names_tgt = [str(d) for d in range(5)], [str(d) for d in range(5, 10)]
    return {
        "source": DigitImages(x[src], y[src], names_src),
        "target_train": DigitImages(x[train_idx], y[train_idx] - 5, names_tgt),
        "target_test": DigitImages(x[test_idx], y[test_idx] - 5, names_tgt),
    }


def run_demo(out_dir: str | Path = "demo-output", *, quick: bool = False, seed: int = 0, verbose: bool = True) -> dict:
    """Run the demo and write ``source.pt``, ``model.pt``, ``report.json`` and ``report.md`` to ``out_dir``.

    Example:
        >>> summary = run_demo("demo-output", quick=True, verbose=False)  # doctest: +SKIP
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run fastest on one thread, and the numbers do not depend on the machine's
    try:
        return _run_demo(Path(out_dir), quick=quick, seed=seed, verbose=verbose)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, *, quick: bool, seed: int, verbose: bool) -> dict:
    check_writable(out, what="demo output", flag="--out", kind="dir")
    out.mkdir(parents=True, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    t_start = time.perf_counter()
    tasks = {k: Pretransformed(v, IMAGE_SIZE) for k, v in digit_tasks(seed=seed).items()}
    # the same path on every CPU: precision="auto" would pick bf16 where the CPU runs it natively
    # (AVX512-BF16, AMX) and fp32 elsewhere, and the "auto" layout, feature engine and compile choices
    # are taken from the machine (or from timings on it): the table would depend on the machine
    common = dict(image_size=IMAGE_SIZE, augment="none", device="cpu", seed=seed, verbose=False, num_workers=0,
                  precision="fp32", channels_last=False, feature_engine="eager", compile=False)
    src_epochs, tgt_epochs = (3, 3) if quick else (12, 10)

    say(f"transferkit demo -> {out.resolve()}")
    say(f"1/3 source task: digits 0-4, {len(tasks['source'])} images, tk:small_cnn from scratch, {src_epochs} epochs")
    t0 = time.perf_counter()
    resume = _continues(out / "source.pt", src_epochs, say)
    try:
        src = finetune("tk:small_cnn", weights=None, data=tasks["source"], policy="full", epochs=src_epochs,
                       batch_size=64, lr=3e-3, checkpoint=out / "source.pt", resume=resume, **common)
    except TrainingInterrupted as exc:  # its data are in memory: the demo itself continues the run, not a resume
        raise _as_the_demos(exc, out) from exc
    say(f"    validation accuracy {src.best['val_acc']:.3f} ({time.perf_counter() - t0:.1f}s), saved {src.checkpoint_path}")

    say(f"2/3 target task: digits 5-9 with {len(tasks['target_train']) // 5} labelled images per class, "
        f"tested on the other {len(tasks['target_test'])}")
    source_file = out / "source.pt"
    runs = [  # (label, finetune arguments, epochs)
        ("feature extraction from source.pt", dict(weights=source_file, policy="feature_extraction", lr=1e-2), tgt_epochs),
        ("fine-tuning from source.pt", dict(weights=source_file, policy="full", lr=3e-3,
                                            export=out / "model.pt"), tgt_epochs),
        ("from scratch (same budget)", dict(weights=None, policy="full", lr=3e-3), tgt_epochs),
        ("from scratch (4x the epochs)", dict(weights=None, policy="full", lr=3e-3), 4 * tgt_epochs),
    ]
    rows, exported = [], None
    for label, kw, epochs in runs:
        t0 = time.perf_counter()
        try:
            r = finetune("tk:small_cnn", data=tasks["target_train"], val_data=tasks["target_test"], epochs=epochs,
                         batch_size=16, restore_best=False, **kw, **common)
        except TrainingInterrupted as exc:
            raise _as_the_demos(exc, out) from exc
        rows.append({"method": label, "epochs": epochs, "test_acc": r.metrics["val_acc"],
                     "seconds": time.perf_counter() - t0, "feature_cache": r.used_feature_cache})
        exported = exported or r.export_report
        say(f"    {label:<34} {epochs:>3} epochs  test accuracy {r.metrics['val_acc']:.3f}  ({rows[-1]['seconds']:.1f}s)")

    say("3/3 reload the exported TorchScript file and predict the test images")
    predictor = load(out / "model.pt")
    test = digit_tasks(seed=seed)["target_test"]  # PIL images: the predictor resizes them itself
    preds = predictor.predict([test[i][0] for i in range(len(test))], batch_size=256)
    reloaded_acc = float(np.mean([p.index == t for p, t in zip(preds, test.targets)]))
    say(f"    {exported.path}: {exported.mode}, max |eager - exported| = {exported.max_abs_diff:.1e}, "
        f"accuracy of the reloaded file {reloaded_acc:.3f}")
    showcase = typical_prediction(preds, test.targets)
    if showcase is None:
        say(f"    no test image is predicted right ({reloaded_acc:.1%} accuracy)")
    else:
        p, n_right = preds[showcase], sum(p.index == t for p, t in zip(preds, test.targets))
        say(f"    a typical test image (#{showcase}, the median confidence of the {n_right} right predictions): "
            f"a {test.classes[test.targets[showcase]]}, predicted {p.label!r} (p={p.probability:.2f})")

    total = time.perf_counter() - t_start
    summary = {"source_val_acc": src.best["val_acc"], "target": rows, "export": str(exported.path),
               "export_max_abs_diff": exported.max_abs_diff, "reloaded_test_acc": reloaded_acc, "showcase": showcase,
               "total_seconds": total, "quick": quick, "torch": torch.__version__}
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)),
                 what="demo report")
    table = _table(rows)
    summary["table"] = table
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text("# transferkit demo\n\n" + table + "\n"),
                 what="demo report")
    say("\n" + table + f"\n\ntotal {total:.0f}s; outputs in {out.resolve()}")
    return summary


def _as_the_demos(exc: TrainingInterrupted, out: Path) -> TrainingInterrupted:
    """An interruption of one of the demo's runs, said with what the demo itself does next (the
    run's own advice names options of `finetune` that `transferkit demo` has not)."""
    if exc.checkpoint is not None and Path(exc.checkpoint) == out / "source.pt":
        then = (f"The checkpoint {str(exc.checkpoint)!r} holds the last completed epoch of the source task: run the "
                "demo again with the same output folder to continue it.")
    else:
        kept = f" (the weights so far are in {str(exc.checkpoint)!r})" if exc.checkpoint is not None else ""
        then = f"Run the demo again with the same output folder to run it again{kept}."
    return TrainingInterrupted(f"Interrupted ({signal_name(exc)}). {then}", exc.checkpoint)


def _continues(checkpoint: Path, epochs: int, say: Any) -> bool:
    """Whether the source task resumes the unfinished run in ``checkpoint`` (one of this demo's
    length, interrupted); an unfinished run of the other length (``--quick`` or not) is replaced,
    and said to be."""
    held = run_in(checkpoint)
    if held is None or held["complete"]:
        return False  # none, or a finished demo's: trained again
    if held.get("epochs") == epochs:
        say(f"    continuing the interrupted run in {checkpoint} (epoch {held['epoch']} of {epochs} done)")
        return True
    say(f"    the interrupted run in {checkpoint} was of {held.get('epochs')} epochs: it is replaced")
    checkpoint.unlink()
    return False


def typical_prediction(preds: list, targets: list[int]) -> int | None:
    """The index of a typical right prediction: among the test images predicted right, the one
    whose confidence is the median (the lower middle one for an even count; ties go to the lower
    index). ``None`` when none is right. A fixed rule, so the showcase does not depend on which
    image happens to come first.

    Example:
        >>> from types import SimpleNamespace as P
        >>> typical_prediction([P(index=0, probability=.9), P(index=1, probability=.6), P(index=2, probability=.7)],
        ...                    [0, 1, 2])
        2
    """
    right = sorted((p.probability, i) for i, (p, t) in enumerate(zip(preds, targets)) if p.index == t)
    return right[(len(right) - 1) // 2][1] if right else None


README_START, README_END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"


def readme_parts(path: str | Path) -> tuple[str, str]:
    """The text of ``path`` before and after its demo table (the demo-table markers); a
    ConfigError saying what is wrong when the file cannot be read or has no such block (checked
    before the demo runs, so that a wrong path costs no training)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read the README to update, {str(path)!r}: {getattr(exc, 'strerror', None) or exc}."
                          ) from None
    if README_START not in text or README_END not in text.split(README_START, 1)[1]:
        raise ConfigError(f"{str(path)!r} has no demo table to update: the lines {README_START} and {README_END} "
                          "mark where it goes (see README.md).")
    head, rest = text.split(README_START, 1)
    return head, rest.split(README_END, 1)[1]


def update_readme(path: str | Path, summary: dict) -> None:
    """Replace the demo table in ``path`` (between the demo-table markers) with ``summary``'s:
    the README shows the numbers the demo printed, never typed ones. Written atomically; a
    README that is a symbolic link stays one (the file it names is rewritten)."""
    head, tail = readme_parts(path)
    block = f"{README_START}\n{summary['table']}\n\n(total {summary['total_seconds']:.0f} s, torch {summary['torch']})\n"
    text = head + block + README_END + tail
    atomic_write(os.path.realpath(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), what="README")


def _table(rows: list[dict]) -> str:
    lines = ["| digits 5-9, 10 labels per class | epochs | test accuracy | seconds |", "|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['epochs']} | {r['test_acc']:.3f} | {r['seconds']:.1f} |" for r in rows]
    return "\n".join(lines)
