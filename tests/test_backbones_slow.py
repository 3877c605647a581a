"""Exhaustive backbone conventions, run by hand: ``pytest -m slow tests/test_backbones_slow.py``.

Every torchvision classifier builds on the CPU with random weights, gives ``[N, num_features]``,
has blocks that partition its parameters in forward order, and scripts as a TransferModel
(backbone + head) that reloads with the eager outputs. For timm: one model of every timm
module (architecture family) on the meta device, every timm model on the meta device
(``-k every_timm``), and a real round trip for a sample.
Takes tens of minutes on a small CPU and a few GB of memory (vit_h_14, regnet_y_128gf)."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from tests.backbone_checks import check_conventions, script_round_trip
from transferkit.backbones import get_backbone
from transferkit.errors import BackboneError

TV = torchvision.models.list_models(module=torchvision.models)
_SMALL = {"inception_v3": 75}  # smallest input a model accepts; others run at 64 px
_FIXED = ("vit_", "swin", "maxvit")  # need their native size
# per-stage output norms: called between stages, read only by the pooled multi-scale features
_OUTPUT_SIDE = {"efficientvim_": ("norm",)}
_REFUSED = {"mobilenetv5_300m_enc"}  # returns a feature map even with global_pool='avg': a clear error


def _check_timm_on_meta(name: str) -> None:
    if name in _REFUSED:
        with pytest.raises(BackboneError, match="not pooled"), torch.device("meta"):
            get_backbone(f"timm:{name}", weights=None)
        return
    with torch.device("meta"):
        bb = get_backbone(f"timm:{name}", weights=None)
    check_conventions(bb, output_side=next((v for k, v in _OUTPUT_SIDE.items() if name.startswith(k)), ()))


def _timm_family_sample() -> list[str]:
    """The first model (alphabetically) of every timm module."""
    from timm.models import _registry

    all_models = set(timm.list_models())
    out = []
    for module in timm.list_modules():
        names = sorted(n for n in _registry._module_to_models.get(module, ()) if n in all_models)
        if names:
            out.append(names[0])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", TV)
def test_every_torchvision_model(name):
    torch.manual_seed(0)
    bb = get_backbone(f"tv:{name}", weights=None)
    size = None if name.startswith(_FIXED) else _SMALL.get(name, 64)
    check_conventions(bb, size=size)
    script_round_trip(bb, size=size, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", _timm_family_sample())
def test_timm_family_on_meta(name):
    _check_timm_on_meta(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", timm.list_models())
def test_every_timm_model_on_meta(name):
    """All of timm.list_models() (about 1,400; half an hour on 2 cores): ``-k every_timm``."""
    _check_timm_on_meta(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenetv3_large_100", "convnext_tiny",
                                  "vit_small_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
                                  "regnety_002", "densenet121", "levit_128s", "mixer_b16_224", "edgenext_small"])
def test_timm_round_trip(name):
    torch.manual_seed(0)
    bb = get_backbone(f"timm:{name}", weights=None)
    check_conventions(bb)
    script_round_trip(bb, atol=1e-3)
