"""Load an exported model and predict labels for files, PIL images, arrays or tensors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from transferkit.backbones._base import InputSpec
from transferkit.data.images import IMAGE_EXTENSIONS, load_image
from transferkit.data.transforms import eval_transform
from transferkit.errors import DataError
from transferkit.export.torchscript import load_scripted


@dataclass
class Prediction:
    """The top label, its probability, and the ``top_k`` (label, probability) pairs."""

    label: str
    index: int
    probability: float
    top_k: list[tuple[str, float]] = field(default_factory=list)
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "label": self.label, "index": self.index, "probability": self.probability,
                "top_k": [{"label": lab, "probability": p} for lab, p in self.top_k]}


class Predictor:
    """An exported model with its labels and preprocessing.

    Example:
        >>> p = transferkit.load("model.pt")  # doctest: +SKIP
        >>> p.predict(["ant.jpg"], top_k=2)[0].label  # doctest: +SKIP
        'ants'
    """

    def __init__(self, module: torch.jit.ScriptModule, metadata: dict[str, Any], device: str | torch.device = "cpu") -> None:
        self.module = module.eval()
        self.metadata = metadata
        self.labels: list[str] = list(metadata["labels"])
        self.input_spec = InputSpec.from_dict(metadata["input_spec"])
        self.device = torch.device(device)
        self._transform = eval_transform(self.input_spec)

    def _to_tensor(self, item: Any) -> torch.Tensor:
        if isinstance(item, (str, Path)):
            item = load_image(item, min_size=self.input_spec.resize_size or self.input_spec.image_size)
        elif isinstance(item, np.ndarray):
            item = Image.fromarray(item)
        if not isinstance(item, (Image.Image, torch.Tensor)):
            raise DataError(f"Cannot predict on a {type(item).__name__}; pass file paths, PIL images, "
                            "HWC uint8 numpy arrays or [C,H,W] tensors.")
        return self._transform(item)

    def _batches(self, inputs: Any) -> list[torch.Tensor]:
        if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
            return [self._to_tensor(x) for x in inputs]
        if isinstance(inputs, (str, Path, Image.Image, np.ndarray, torch.Tensor)):
            inputs = [inputs]
        return [self._to_tensor(x) for x in inputs]

    @torch.no_grad()
    def predict_proba(self, inputs: Any, *, batch_size: int = 32) -> torch.Tensor:
        """Class probabilities ``[N, num_classes]`` (softmax of the logits)."""
        items = self._batches(inputs)
        if not items:
            return torch.empty(0, len(self.labels))
        out = []
        for i in range(0, len(items), batch_size):
            xb = torch.stack(items[i:i + batch_size]).to(self.device)
            out.append(torch.softmax(self.module(xb).float(), dim=1).cpu())
        return torch.cat(out)

    def predict(self, inputs: Any, *, top_k: int = 1, batch_size: int = 32) -> list[Prediction]:
        """Predict labels; ``inputs`` is one item or a sequence of paths, PIL images,
        numpy arrays or tensors (a ``[N, C, H, W]`` tensor is N items)."""
        probs = self.predict_proba(inputs, batch_size=batch_size)
        sources = _sources(inputs, len(probs))
        k = max(1, min(int(top_k), len(self.labels)))
        preds = []
        for row, src in zip(probs, sources):
            p, idx = row.topk(k)
            pairs = [(self.labels[j], float(q)) for q, j in zip(p.tolist(), idx.tolist())]
            preds.append(Prediction(pairs[0][0], int(idx[0]), pairs[0][1], pairs, src))
        return preds

    def predict_folder(self, folder: str | Path, *, top_k: int = 1, batch_size: int = 32) -> list[Prediction]:
        """Predict every image file below ``folder`` (sorted by path)."""
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise DataError(f"No image files under {str(folder)!r}.")
        return self.predict([str(f) for f in files], top_k=top_k, batch_size=batch_size)


def _sources(inputs: Any, n: int) -> list[str | None]:
    if isinstance(inputs, (str, Path)):
        return [str(inputs)]
    if isinstance(inputs, Iterable) and not isinstance(inputs, (torch.Tensor, np.ndarray, Image.Image)):
        return [str(x) if isinstance(x, (str, Path)) else None for x in inputs]  # type: ignore[union-attr]
    return [None] * n


def load(path: str | Path, *, device: str | torch.device = "cpu") -> Predictor:
    """Load an exported transferkit model as a :class:`Predictor`."""
    module, meta = load_scripted(path, map_location=device)
    return Predictor(module, meta, device=device)
