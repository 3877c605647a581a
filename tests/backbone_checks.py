"""Convention checks every backbone must pass (shared by the fast and the slow backbone tests)."""

from __future__ import annotations

import io

import torch
from torch import nn

from transferkit.backbones import Backbone, check_blocks
from transferkit.heads import build_head
from transferkit.model import ImagePreprocess, TransferModel


def first_use_ranks(trunk: nn.Module, x: torch.Tensor) -> tuple[dict[str, int | None], torch.Tensor]:
    """``{parameter: rank of the first call of its nearest called owning module}`` and the output.
    Parameters registered on the trunk itself get ``None`` (the trunk is called first but may use
    them anywhere, e.g. a class token)."""
    order: dict[str, int] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: object) -> None:
            order.setdefault(name, len(order))
        return hook

    hooks = [m.register_forward_pre_hook(hook_for(name)) for name, m in trunk.named_modules()]
    try:
        with torch.no_grad():
            out = trunk(x)
    finally:
        for h in hooks:
            h.remove()
    ranks: dict[str, int | None] = {}
    for pname, _ in trunk.named_parameters():
        parts = pname.split(".")[:-1]
        while parts and ".".join(parts) not in order:
            parts.pop()
        ranks[pname] = order[".".join(parts)] if parts else None
    return ranks, out


def check_conventions(bb: Backbone, *, batch: int = 2, size: int | None = None,
                      output_side: tuple[str, ...] = ()) -> torch.Tensor:
    """Forward shape ``[N, num_features]``, blocks partition the parameters, blocks ordered as
    the forward pass first uses them, an input spec. Returns the features.

    ``output_side``: blocks whose layers run between stages but feed only the output
    features (EfficientViM normalises each stage's state for its multi-scale features); they
    must come last, whenever they are first called."""
    spec = bb.input_spec
    assert spec.kind == "image" and spec.image_size >= 8 and len(spec.mean) == len(spec.std) == spec.channels
    assert all(s > 0 for s in spec.std) and spec.interpolation in ("nearest", "bilinear", "bicubic")
    assert bb.blocks, f"{bb.name} has no blocks"
    check_blocks(bb.trunk, bb.blocks, name=bb.name)
    size = size or spec.image_size
    device = next(bb.trunk.parameters()).device
    bb.trunk.eval()
    ranks, out = first_use_ranks(bb.trunk, torch.randn(batch, spec.channels, size, size, device=device))
    assert tuple(out.shape) == (batch, bb.num_features), f"{bb.name}: {tuple(out.shape)} != {(batch, bb.num_features)}"
    names = [b.name for b in bb.blocks]
    if output_side:
        assert names[-len(output_side):] == list(output_side), names
    firsts = []
    for b in bb.blocks:
        if b.name in output_side:
            continue
        used = [r for p, r in ranks.items() if r is not None and b.owns(p)]
        if used:
            firsts.append((min(used), b.name))
    assert firsts == sorted(firsts), f"{bb.name}: blocks out of forward order: {firsts}"
    return out


def script_round_trip(bb: Backbone, *, size: int | None = None, classes: int = 3, atol: float = 1e-4) -> None:
    """TransferModel(preprocess, trunk, head) scripts, saves, loads and gives the eager outputs."""
    torch.manual_seed(0)
    spec = bb.input_spec
    model = TransferModel(ImagePreprocess(spec.mean, spec.std), bb.trunk, build_head(bb.num_features, classes)).eval()
    size = size or spec.image_size
    x = torch.randint(0, 256, (2, spec.channels, size, size), dtype=torch.uint8)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    assert got.shape == (2, classes) and isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, expected, atol=atol, rtol=1e-4)
