"""Helpers for the export, predictor, CLI and C++ tests: tiny models and file tampering."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import transferkit
from transferkit.backbones.custom import from_module
from transferkit.export import export_torchscript


def tiny_model(num_outputs: int = 3, backbone: str = "tk:small_cnn", seed: int = 0):
    """An untrained model over a tiny backbone (weights=None) and its backbone."""
    torch.manual_seed(seed)
    bb = transferkit.get_backbone(backbone, weights=None)
    return transferkit.build_model(bb, num_outputs).eval(), bb


def images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def export_tiny(path: Path, *, task: str = "multiclass", labels=("ant", "bee", "cat"), size: int = 16, **kw):
    """Export an untrained tk:small_cnn; returns (report, eager model)."""
    model, bb = tiny_model(len(labels))
    spec = bb.input_spec.replace(image_size=size).to_dict()
    meta = {"labels": list(labels), "input_spec": spec, "task": task,
            "training": {"backbone": bb.name, "epochs": 0}}
    return export_torchscript(model, path, metadata=meta, example_inputs=images(3, size), **kw), model


def export_tiny_onnx(path: Path):
    """Export an untrained two-output tk:small_cnn to ONNX at ``path`` (32 px examples);
    returns (eager model, backbone)."""
    from transferkit.export import export_onnx

    model, bb = tiny_model(2)
    export_onnx(model, path, metadata={"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()},
                example_inputs=images(2))
    return model, bb


def rewrite_zip(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None]) -> Path:
    """Copy a TorchScript zip entry by entry through ``edit(name, data)`` (name without the
    archive folder; returning None drops the entry), as a hand edit of the file would."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            new = edit(info.filename.split("/", 1)[1], zin.read(info.filename))
            if new is not None:
                zout.writestr(info, new)
    return dst


class PatchAttention(nn.Module):
    """A tiny ViT-like trunk: patches, one ``nn.MultiheadAttention`` (as torchvision's ViTs
    use it) and one ``nn.TransformerEncoderLayer``, both batch first, whose fused fast paths
    run without gradients in eval mode; the mean of the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, stride=8)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.attention(tokens, tokens, tokens, need_weights=False)[0]
        return self.encoder(tokens).mean(1)


def attention_model():
    """An untrained model over `PatchAttention` (32 px) and its backbone."""
    torch.manual_seed(0)
    bb = from_module(PatchAttention().eval(), input_spec={"image_size": 32}, name="patch_attention")
    return transferkit.build_model(bb, 2).eval(), bb


class LengthAsNumber(nn.Module):
    """An audio trunk whose code turns the clip length into a number (``float(shape)``): a
    trace keeps the length it saw, while the eager pass (and a scripted one) follow every length."""

    def __init__(self) -> None:
        super().__init__()
        self.frames = nn.Conv1d(1, 8, 40, stride=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.frames(torch.nan_to_num(x).unsqueeze(1)))
        return y.sum(-1) / float(y.shape[-1])


def length_as_number_model():
    """An untrained model over `LengthAsNumber` (16 kHz audio) and its backbone."""
    torch.manual_seed(0)
    bb = from_module(LengthAsNumber(), input_spec={"kind": "audio", "sample_rate": 16000}, name="length_as_number",
                     num_features=8)
    return transferkit.build_model(bb, 2).eval(), bb
