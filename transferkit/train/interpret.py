"""Looking at what a classifier got right and wrong (fastai's ``show_results``,
``plot_top_losses`` and ``most_confused``), as plain functions.

Each takes the model's outputs on a dataset, or the model itself, and the dataset:

- ``source``: the logits ``[N, num_classes]`` in the dataset's order (what
  `transferkit.train.evaluate` returns as ``"logits"``; from a model trained on cached
  features, the head's logits on the cached validation features are the same numbers), or
  an ``nn.Module`` taking a batch of the dataset's inputs (a [`TransferModel`][transferkit.TransferModel]).
- ``dataset``: items ``(image, class index)`` where the image is what the model sees before
  normalisation: a ``uint8`` tensor ``[3, H, W]`` from the eval transform
  (``bundle.val.view(transform=eval_transform(spec))``), a float tensor in [0, 1], or a PIL
  image. Audio datasets (waveform tensors ``[T]``) are drawn as waveforms.
- ``classes``: the class names, in the order of the logits.

Single-label classification only (``task="multiclass"``): probabilities are the softmax of
the logits, a sample's loss is its cross-entropy ``-log p(true class)``.

Example:
    >>> from transferkit.train.interpret import most_confused
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    >>> most_confused(logits, [0, 0, 1], ["ants", "bees"])
    [('ants', 'bees', 1)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferkit.errors import ConfigError
from transferkit.train.reporting import pyplot, save_figure
from transferkit.data.audio import pad_waveforms
from transferkit.data.images import dataset_targets


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return value


def predict_logits(model: nn.Module, dataset: Any, *, batch_size: int = 32,
                   device: str | torch.device | None = None) -> torch.Tensor:
    """``model``'s logits ``[N, C]`` over ``dataset`` (its inputs stacked in batches), in eval mode.

    Example:
        >>> logits = predict_logits(result.model, val_dataset)  # doctest: +SKIP
    """
    _check_count("batch_size", batch_size)
    dev = torch.device(device) if device is not None else next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    outs = []
    try:
        with torch.no_grad():
            for i in range(0, len(dataset), batch_size):
                xs = [dataset[j][0] for j in range(i, min(i + batch_size, len(dataset)))]
                if not all(isinstance(x, torch.Tensor) for x in xs):
                    raise ConfigError("predict_logits needs a dataset of tensors (a transform such as "
                                      "eval_transform(spec)); got "
                                      f"{type(next(x for x in xs if not isinstance(x, torch.Tensor))).__name__}.")
                xb = pad_waveforms(xs) if xs[0].ndim == 1 else torch.stack(xs)
                outs.append(model(xb.to(dev)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0, 0)


def _labels(dataset_or_labels: Any) -> torch.Tensor:
    if isinstance(dataset_or_labels, torch.Tensor):
        return dataset_or_labels.long().flatten()
    if isinstance(dataset_or_labels, (list, tuple, np.ndarray)):
        return torch.as_tensor(np.asarray(dataset_or_labels), dtype=torch.long).flatten()
    return torch.as_tensor(dataset_targets(dataset_or_labels), dtype=torch.long)


def _outputs(source: Any, dataset: Any, classes: Sequence[str], *, batch_size: int = 32,
             device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits ``[N, C]``, labels ``[N]``) checked against each other and ``classes``."""
    if isinstance(source, nn.Module):
        if isinstance(dataset, (torch.Tensor, list, tuple, np.ndarray)):
            raise ConfigError("With a model, pass the dataset itself (its images are needed), not labels.")
        logits = predict_logits(source, dataset, batch_size=batch_size, device=device)
    elif isinstance(source, (torch.Tensor, np.ndarray)):
        logits = torch.as_tensor(source).float().cpu()
    else:
        raise ConfigError(f"Expected the logits [N, num_classes] (a tensor) or a model, got {type(source).__name__}.")
    labels = _labels(dataset)
    if logits.ndim != 2 or logits.shape[1] != len(classes):
        raise ConfigError(f"The logits have shape {tuple(logits.shape)} but there are {len(classes)} classes "
                          f"({list(classes)[:5]}...): pass logits [N, {len(classes)}] of a single-label classifier.")
    if logits.shape[0] != labels.shape[0]:
        raise ConfigError(f"{logits.shape[0]} rows of logits for {labels.shape[0]} samples: the logits must be "
                          "the model's outputs on this dataset, in its order (an unshuffled loader).")
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ConfigError(f"Labels must be class indices in 0..{len(classes) - 1}, got {labels.min()}..{labels.max()}.")
    return logits, labels


def confusion(source: Any, dataset_or_labels: Any, classes: Sequence[str], **kwargs: Any) -> np.ndarray:
    """The confusion matrix ``[true, predicted]`` of counts.

    Example:
        >>> confusion(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), [1, 1], ["a", "b"]).tolist()
        [[0, 0], [1, 1]]
    """
    logits, labels = _outputs(source, dataset_or_labels, classes, **kwargs)
    m = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(m, (labels.numpy(), logits.argmax(1).numpy()), 1)
    return m


def most_confused(source: Any, dataset_or_labels: Any, classes: Sequence[str], *, min_count: int = 1,
                  **kwargs: Any) -> list[tuple[str, str, int]]:
    """The mistakes, grouped: ``(true class, predicted class, count)`` for every pair of
    different classes with at least ``min_count`` samples, most frequent first (then by name).
    ``dataset_or_labels``: the dataset (its labels are read) or the labels themselves.

    Example:
        >>> logits = torch.tensor([[0.0, 3.0, 0.0], [0.0, 3.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
        >>> most_confused(logits, [0, 0, 2, 2], ["ant", "bee", "wasp"])
        [('ant', 'bee', 2), ('wasp', 'ant', 1)]
    """
    _check_count("min_count", min_count)
    m = confusion(source, dataset_or_labels, classes, **kwargs)
    pairs = [(classes[i], classes[j], int(m[i, j])) for i in range(len(classes)) for j in range(len(classes))
             if i != j and m[i, j] >= min_count]
    return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))


def _picture(img: Any) -> np.ndarray:
    """An image item as ``[H, W, 3]`` uint8 (or a 1-D waveform array, drawn as a line)."""
    from PIL import Image

    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"))
    t = torch.as_tensor(np.asarray(img)) if not isinstance(img, torch.Tensor) else img.detach().cpu()
    if t.ndim == 1:
        return t.float().nan_to_num(0.0).numpy()  # a waveform (NaN padding dropped to silence)
    if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
        t = t.permute(1, 2, 0)
    if t.ndim == 2:
        t = t.unsqueeze(-1)
    if t.ndim != 3:
        raise ConfigError(f"Cannot draw an image of shape {tuple(t.shape)}: expected [3, H, W], [H, W, 3] or [H, W].")
    if t.shape[-1] == 1:
        t = t.expand(-1, -1, 3)
    t = t[..., :3]
    if t.dtype != torch.uint8:
        t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return t.numpy()


def _grid(dataset: Any, indices: Sequence[int], titles: Sequence[str], colors: Sequence[str], path: str | Path,
          *, suptitle: str, cell: float = 2.3) -> Path:

    plt = pyplot()
    n = len(indices)
    cols = min(n, max(1, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    title_h = 0.2 * (1 + max((t.count("\n") for t in titles), default=0))  # inches of each cell's title
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, (cell + title_h) * rows + 0.5), squeeze=False,
                             layout="constrained")  # room for every row's titles, not only the first's
    for ax in axes.flat:
        ax.axis("off")
    for ax, i, title, color in zip(axes.flat, indices, titles, colors):
        pic = _picture(dataset[i][0])
        if pic.ndim == 1:
            ax.plot(pic, linewidth=0.5, color="0.3")
            ax.set_ylim(-1.05, 1.05)
        else:
            ax.imshow(pic)
        ax.set_title(title, fontsize=8, color=color)
    fig.suptitle(suptitle, fontsize=10)
    return save_figure(fig, path)


def show_results(source: Any, dataset: Any, classes: Sequence[str], path: str | Path, *, n: int = 9, seed: int = 0,
                 **kwargs: Any) -> Path:
    """A grid of ``n`` validation images (a seeded random choice, in dataset order) titled with
    the true label and the prediction with its probability, green when right and red when
    wrong, as a PNG at ``path``.

    Example:
        >>> show_results(logits, val_dataset, ["ants", "bees"], "plots/results.png", n=9)  # doctest: +SKIP
    """
    _check_count("n", n)
    logits, labels = _outputs(source, dataset, classes, **kwargs)
    if len(labels) == 0:
        raise ConfigError("show_results got an empty dataset.")
    probs = torch.softmax(logits, dim=1)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(labels), size=min(n, len(labels)), replace=False).tolist())
    p, pred = probs.max(1)
    titles = [f"true: {classes[labels[i]]}\npred: {classes[pred[i]]} ({p[i]:.2f})" for i in chosen]
    colors = ["tab:green" if pred[i] == labels[i] else "tab:red" for i in chosen]
    right = int((pred == labels).sum())
    return _grid(dataset, chosen, titles, colors, path,
                 suptitle=f"{len(chosen)} of {len(labels)} validation samples ({right}/{len(labels)} right overall)")


def top_losses(source: Any, dataset_or_labels: Any, classes: Sequence[str], *, k: int = 9,
               **kwargs: Any) -> list[tuple[int, float, str, str, float]]:
    """The ``k`` samples with the highest loss: ``(index, loss, true class, predicted class,
    probability of the prediction)``, highest loss first.

    Example:
        >>> top_losses(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), [1, 1], ["a", "b"], k=1)[0][:1]
        (0,)
    """
    _check_count("k", k)
    logits, labels = _outputs(source, dataset_or_labels, classes, **kwargs)
    losses = torch.nn.functional.cross_entropy(logits.double(), labels, reduction="none")  # exact, not capped
    probs = torch.softmax(logits, dim=1)
    order = sorted(range(len(labels)), key=lambda i: (-float(losses[i]), i))[:k]
    p, pred = probs.max(1)
    return [(i, float(losses[i]), classes[labels[i]], classes[pred[i]], float(p[i])) for i in order]


def plot_top_losses(source: Any, dataset: Any, classes: Sequence[str], path: str | Path, *, k: int = 9,
                    **kwargs: Any) -> Path:
    """A grid of the ``k`` validation images with the highest loss (the model's worst
    mistakes, or its least sure right answers), each titled with the prediction and its
    probability, the true label and the loss, as a PNG at ``path``.

    Example:
        >>> plot_top_losses(result.model, val_dataset, ["ants", "bees"], "plots/top_losses.png", k=9)  # doctest: +SKIP
    """
    rows = top_losses(source, dataset, classes, k=k, **kwargs)
    if not rows:
        raise ConfigError("plot_top_losses got an empty dataset.")
    titles = [f"pred: {pred} ({p:.2f})\ntrue: {true}, loss {loss:.2f}" for _, loss, true, pred, p in rows]
    colors = ["tab:green" if true == pred else "tab:red" for _, _, true, pred, _ in rows]
    return _grid(dataset, [r[0] for r in rows], titles, colors, path,
                 suptitle=f"top {len(rows)} losses: predicted / true / loss")


def write_interpretation(plots_dir: str | Path, source: Any, dataset: Any, classes: Sequence[str], *, n: int = 9,
                         k: int = 9, **kwargs: Any) -> dict[str, Any]:
    """``show_results.png`` and ``top_losses.png`` under ``plots_dir`` and the most confused
    pairs: ``{"show_results": Path, "top_losses": Path, "most_confused": [(true, pred, count), ...]}``.
    A model is run over the dataset once.

    Example:
        >>> write_interpretation("plots", logits, val_dataset, ["ants", "bees"])["top_losses"]  # doctest: +SKIP
        PosixPath('plots/top_losses.png')
    """
    if isinstance(source, nn.Module):
        source = predict_logits(source, dataset, batch_size=kwargs.pop("batch_size", 32),
                                device=kwargs.pop("device", None))
    out = Path(plots_dir)
    return {"show_results": show_results(source, dataset, classes, out / "show_results.png", n=n, **kwargs),
            "top_losses": plot_top_losses(source, dataset, classes, out / "top_losses.png", k=k),
            "most_confused": most_confused(source, dataset, classes)}
