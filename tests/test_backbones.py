"""Backbone conventions over a fast subset of the registry (one model of every torchvision
family, several timm families, transferkit's own), names, weights and bring-your-own.

Most models are built on the ``meta`` device: the same modules and block maps without
allocating or initialising weights, so the forward pass checks shapes and order quickly. A
smaller set runs on the CPU for real and makes the TorchScript round trip. The exhaustive
versions are in test_backbones_slow.py (``pytest -m slow``)."""

from __future__ import annotations

import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from tests.backbone_checks import check_conventions, script_round_trip
from transferkit.backbones import get_backbone, list_backbones
from transferkit.backbones.custom import from_module, from_torchscript
from transferkit.data.transforms import eval_transform
from transferkit.errors import BackboneError, PolicyError, UnknownBackboneError, WeightsError
import transferkit as tk
from transferkit.policies import Policy, apply_policy, trainable_parameter_names

# One model of every torchvision family, with the block names expected at both ends.
TV_FAMILIES = {
    "alexnet": ["stage1", "fc7"], "convnext_tiny": ["stem", "norm"], "densenet121": ["stem", "norm"],
    "efficientnet_b0": ["stem", "conv_head"], "efficientnet_v2_s": ["stem", "conv_head"],
    "googlenet": ["stem", "inception5"], "inception_v3": ["stem", "mixed7"], "maxvit_t": ["stem", "pre_logits"],
    "mnasnet0_5": ["stem", "conv_head"], "mobilenet_v2": ["stem", "conv_head"],
    "mobilenet_v3_small": ["stem", "pre_logits"], "regnet_x_400mf": ["stem", "stages.3"],
    "resnet18": ["stem", "layer4"], "resnext50_32x4d": ["stem", "layer4"], "shufflenet_v2_x0_5": ["stem", "conv5"],
    "squeezenet1_1": ["conv1", "fire9"], "swin_t": ["embed", "norm"], "swin_v2_t": ["embed", "norm"],
    "vgg11_bn": ["stage1", "fc7"], "vit_b_16": ["embed", "norm"], "wide_resnet50_2": ["stem", "layer4"],
}
# timm families: (name, create_model kwargs for a tiny/fast configuration, expected first/last block names).
TIMM_FAMILIES = {
    "resnet10t": ({}, ["stem", "layer4"]),
    "vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 3}, ["embed", "norm"]),
    "convnext_atto": ({}, ["stem", "head.norm"]),
    "efficientnet_b0": ({}, ["stem", "conv_head"]),
    "mobilenetv3_small_050": ({}, ["stem", "conv_head"]),
    "swin_tiny_patch4_window7_224": ({}, ["embed", "norm"]),
    "regnetx_002": ({}, ["stem", "s4"]),
    "densenet121": ({}, ["stem", "features.norm5"]),
    "deit_tiny_patch16_224": ({}, ["embed", "norm"]),
    "poolformer_s12": ({}, ["stem", "trunk.head"]),  # no group_matcher: top-level children, stages split
}
# Real CPU forward + TorchScript round trip of backbone + head: (name, kwargs, input size).
SCRIPTED = [
    ("tv:resnet18", {}, 64), ("tv:squeezenet1_1", {}, 64),
    ("timm:resnet10t", {}, 64), ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, 32),
    ("tk:cifar_resnet20", {}, 32), ("tk:small_cnn", {}, 32),
]


def _meta_backbone(name: str, **kwargs):
    device = "cpu" if "regnet_" in name else "meta"  # torchvision's RegNet computes its widths with tensors
    with torch.device(device):
        return get_backbone(name, weights=None, **kwargs)


@pytest.mark.parametrize("name", sorted(TV_FAMILIES))
def test_torchvision_family_conventions(name):
    bb = _meta_backbone(f"tv:{name}")
    check_conventions(bb)
    first, last = TV_FAMILIES[name]
    assert (bb.block_names[0], bb.block_names[-1]) == (first, last)
    assert len(bb.blocks) >= 4


def test_every_torchvision_classifier_is_registered_and_its_family_tested():
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    assert set(list_backbones("tv:*")) == {f"tv:{n}" for n in names}

    def family(n: str) -> str:  # the torchvision module that defines the model
        return torchvision.models.get_model_builder(n).__module__

    assert {family(n) for n in names} == {family(n) for n in TV_FAMILIES}


@pytest.mark.parametrize("name", sorted(TIMM_FAMILIES))
def test_timm_family_conventions(name):
    kwargs, (first, last) = TIMM_FAMILIES[name]
    bb = _meta_backbone(f"timm:{name}", **kwargs)
    check_conventions(bb)
    assert (bb.block_names[0], bb.block_names[-1]) == (first, last)


def test_timm_encoders_that_return_tokens_are_pooled_or_refused():
    """Vision encoders of multimodal models (timm's ``*_enc``) return tokens by default: the
    backbone asks for average pooling; one that still returns a map is refused clearly."""
    bb = _meta_backbone("timm:qwen3_vit_88m_enc", depth=2)
    check_conventions(bb)
    assert bb.trunk.global_pool == "avg"
    with pytest.raises(BackboneError, match=r"mobilenetv5_300m_enc returns features of shape \[1, 2048, 16, 16\]"):
        _meta_backbone("timm:mobilenetv5_300m_enc")


def test_vit_blocks_are_embed_blocks_norm():
    for name, kw, depth in (("tv:vit_b_16", {"image_size": 32}, 12),
                            ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 3}, 3)):
        bb = _meta_backbone(name, **kw)
        assert bb.block_names == ["embed", *[f"blocks.{i}" for i in range(depth)], "norm"], name
        check_conventions(bb)


def test_blocks_follow_the_order_of_execution_where_timm_overlaps_them():
    """CaiT's matcher groups blocks.23 with class-attention block 1 and the norm (for layer decay)."""
    bb = _meta_backbone("timm:cait_xxs24_224")
    assert bb.block_names == ["embed", *[f"blocks.{i}" for i in range(24)], "blocks_token_only.0",
                              "blocks_token_only.1", "norm"]
    check_conventions(bb)


@pytest.mark.parametrize("name,kwargs,size", SCRIPTED, ids=[s[0] for s in SCRIPTED])
def test_forward_and_torchscript_round_trip(name, kwargs, size):
    torch.manual_seed(0)
    bb = get_backbone(name, weights=None, **kwargs)
    feats = check_conventions(bb, size=size)
    assert torch.isfinite(feats).all()
    script_round_trip(bb, size=size)


@pytest.mark.parametrize("name", ["tv:googlenet", "tv:inception_v3"])
def test_inception_and_googlenet_trunks_script_to_a_plain_tensor(name):
    """torchvision's own forward returns a namedtuple when scripted; the trunk must not. (The real
    round trip of these two is in the slow tests: scripting them takes long on a small CPU.)"""
    bb = _meta_backbone(name)
    assert all("aux" not in n.lower() for n, _ in bb.trunk.named_parameters()) and not bb.trunk.aux_logits
    scripted = torch.jit.script(bb.trunk)
    assert str(next(scripted.graph.outputs()).type()) == "Tensor"


def test_input_spec_comes_from_the_weights():
    assert get_backbone.__name__  # the specs below need no download
    tv = _meta_backbone("tv:inception_v3").input_spec
    assert (tv.image_size, tv.resize_size) == (299, 342)
    timm_spec = _meta_backbone("timm:vit_small_patch16_224.augreg_in21k_ft_in1k").input_spec
    assert (timm_spec.image_size, timm_spec.resize_size, timm_spec.mean) == (224, 248, (0.5, 0.5, 0.5))
    assert timm_spec.interpolation == "bicubic"
    full = _meta_backbone("timm:xcit_nano_12_p16_224").input_spec  # crop_pct 1.0: still the shorter side, cropped
    assert (full.image_size, full.resize_size) == (224, 224)
    model = timm.create_model("xcit_nano_12_p16_224", pretrained=False)
    theirs = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, :100] = 255  # a white left third: outside timm's centre crop
    ours = eval_transform(full)(Image.fromarray(wide)).float() / 255
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (full.mean, full.std))
    want = theirs(Image.fromarray(wide)) * std + mean  # timm's output, unnormalised
    assert ours.shape == want.shape == (3, 224, 224) and (ours - want).abs().max() < 0.01
    squash = _meta_backbone("timm:tiny_vit_21m_512.dist_in22k_ft_in1k").input_spec  # crop_mode 'squash': no crop
    assert (squash.image_size, squash.resize_size) == (512, None)
    cifar = get_backbone("tk:cifar_resnet20", weights=None).input_spec
    assert (cifar.image_size, cifar.resize_size, cifar.mean) == (32, None, (0.485, 0.456, 0.406))


# ---------------------------------------------------------------- names

@pytest.mark.parametrize("typed, first", [
    ("timm:tf_efficientnet_lite", "timm:tf_efficientnet_lite0"),  # a prefix: its shortest completion
    ("tv:resnet", "tv:resnet18"),
    ("tv:efficientnet_b", "tv:efficientnet_b0"),
    ("tv:resnet-18", "tv:resnet18"),  # another spelling of the same name
    ("tv:mobilenet-v3-small", "tv:mobilenet_v3_small"),
    ("timm:convnext_tnyi", "timm:convnext_tiny"),  # a typo: the most similar
    ("tf_efficientnet_lite", "tf_efficientnet_lite0"),  # without the source prefix
])
def test_suggestions_name_the_closest_backbone_first(typed, first):
    with pytest.raises(UnknownBackboneError) as exc:
        get_backbone(typed, weights=None)
    assert f"Did you mean '{first}'" in str(exc.value)


def test_suggestions_among_names_with_superscript_digits():
    """A name holding "\u00b2" (a class "area1\u00b2") passed str.isdigit() in the ranking's sort key and
    then failed int(): the suggestion raised a ValueError instead of naming the close ones."""
    from transferkit.errors import closest

    assert closest("area12", ["area1\u00b2", "area13"]) == ["area1\u00b2", "area13"]


def test_unknown_names_suggest_close_ones():
    with pytest.raises(UnknownBackboneError, match=r"Did you mean 'tv:resnet50'.*list_backbones\('tv:\*'\)"):
        get_backbone("tv:resnet5", weights=None)
    with pytest.raises(UnknownBackboneError, match="cifar_resnet20"):
        get_backbone("cifar_resnet2", weights=None)
    with pytest.raises(UnknownBackboneError, match="Unknown backbone source 'tvv'.*'tv'"):
        get_backbone("tvv:resnet18", weights=None)
    with pytest.raises(UnknownBackboneError, match="vit_small_patch16_224"):
        get_backbone("timm:vit_small_patch16_224.no_such_tag", weights=None)


def test_plain_names_resolve_only_when_unambiguous():
    with pytest.raises(UnknownBackboneError, match="ambiguous.*tv:resnet18.*timm:resnet18|ambiguous.*timm:resnet18.*tv:resnet18"):
        get_backbone("resnet18", weights=None)
    assert get_backbone("cifar_resnet20", weights=None).name == "tk:cifar_resnet20"
    assert "tk:cifar_resnet56" in list_backbones("cifar_resnet*")
    assert "timm:convnext_atto" in list_backbones("timm:convnext_a*")


# ---------------------------------------------------------------- weights

def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_weights_files_in_every_layout_load_strictly(tmp_path):
    torch.manual_seed(1)
    src = get_backbone("tk:cifar_resnet20", weights=None).trunk.state_dict()
    ref = {k: v for k, v in src.items() if not k.endswith("num_batches_tracked")}
    ref.update({"linear.weight": torch.randn(10, 64), "linear.bias": torch.randn(10)})
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.items()}, str(tmp_path / "w.safetensors"))
    files = [_save(ref, tmp_path / "plain.pt"), _save({"state_dict": ref, "epoch": 3}, tmp_path / "nested.pth"),
             _save({"model": {f"module.{k}": v for k, v in ref.items()}}, tmp_path / "ddp.th"),
             tmp_path / "w.safetensors"]
    for f in files:
        bb = get_backbone("tk:cifar_resnet20", weights=f)
        assert torch.equal(bb.trunk.state_dict()["layer3.2.conv2.weight"], ref["layer3.2.conv2.weight"]), f
        assert bb.weights == str(f)


def test_mismatched_weights_report_missing_unexpected_and_shapes(tmp_path):
    sd = get_backbone("tk:small_cnn", weights=None).trunk.state_dict()
    sd["renamed.weight"] = sd.pop("stem.0.weight")
    sd["stage3.0.1.weight"] = torch.zeros(7)
    f = _save(sd, tmp_path / "bad.pt")
    with pytest.raises(WeightsError) as info:
        get_backbone("tk:small_cnn", weights=f)
    msg = str(info.value)
    assert "1 missing keys: stem.0.weight" in msg and "1 unexpected keys: renamed.weight" in msg
    assert "stage3.0.1.weight: file (7,) vs model (128,)" in msg and "same architecture" in msg


def test_missing_file_and_default_without_download(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        get_backbone("tk:cifar_resnet20", weights=tmp_path / "nope.th")
    with pytest.raises(WeightsError, match="no downloadable weights.*weights=None"):
        get_backbone("tk:cifar_resnet20", weights="DEFAULT")


def test_pickles_with_objects_need_an_explicit_opt_in(tmp_path):
    sd = get_backbone("tk:small_cnn", weights=None).trunk.state_dict()
    f = _save({"state_dict": sd, "args": Path("x")}, tmp_path / "old.pt")  # a non-tensor Python object
    # the way to pass it where the backbone is named (it was get_backbone's alone, and torch's own
    # text cut short, with terminal escape codes in it)
    with pytest.raises(WeightsError, match=r"holds Python objects beyond tensors \(here pathlib\.\w*Path\), .* "
                                           r"finetune\(\.\.\., backbone_options=\{'weights_only': False\}\)") as info:
        get_backbone("tk:small_cnn", weights=f)
    assert "\x1b" not in str(info.value)
    assert get_backbone("tk:small_cnn", weights=f, weights_only=False).weights == str(f)
    # the same words for an audio backbone over that image backbone, and for a file of its own trunk
    spec = get_backbone("spec:tk:small_cnn", weights=None, sample_rate=8000, n_mels=32).trunk.state_dict()
    own = _save({"state_dict": spec, "args": Path("x")}, tmp_path / "spec.pt")
    for weights in (f, own):
        with pytest.raises(WeightsError, match=r"backbone_options=\{'weights_only': False\}"):
            get_backbone("spec:tk:small_cnn", weights=weights, sample_rate=8000, n_mels=32)
        assert get_backbone("spec:tk:small_cnn", weights=weights, sample_rate=8000, n_mels=32,
                            weights_only=False).weights == str(weights)
    from transferkit.spelling import cli_spelling

    typed = "`transferkit finetune ... --set backbone_options='{\"weights_only\": false}'`."
    assert typed in cli_spelling(str(info.value))


def test_torchvision_file_weights_skip_the_old_classifier(tmp_path):
    torch.manual_seed(2)
    import torchvision

    full = torchvision.models.resnet18(weights=None)
    f = _save(full.state_dict(), tmp_path / "r18.pth")
    bb = get_backbone("tv:resnet18", weights=f)
    assert torch.equal(bb.trunk.layer4[1].conv2.weight, full.layer4[1].conv2.weight)


def test_offline_torchvision_download_names_the_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as info:
        get_backbone("tv:squeezenet1_1", weights="DEFAULT")
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth") in str(info.value)
    with pytest.raises(WeightsError, match="Unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        get_backbone("tv:squeezenet1_1", weights="IMAGENET9K")
    with pytest.raises(WeightsError, match="Unknown weights 'default' for tv:squeezenet1_1. Did you mean 'DEFAULT'"):
        get_backbone("tv:squeezenet1_1", weights="default")  # a tag in other case: said as the one it is


def test_offline_timm_download_names_the_hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsError) as info:
        get_backbone("timm:resnet10t", weights="DEFAULT")
    msg = str(info.value)
    assert str(tmp_path / "hf" / "models--timm--resnet10t.c3_in1k") in msg and "weights=None" in msg
    with pytest.raises(WeightsError, match="Unknown pretrained tag 'nope'.*c3_in1k"):
        get_backbone("timm:resnet10t", weights="nope")


def test_timm_local_file_loads_strictly(tmp_path):
    import timm

    torch.manual_seed(3)
    src = timm.create_model("resnet10t", pretrained=False)  # with its 1000-class classifier, as on the hub
    from safetensors.torch import save_file

    save_file(src.state_dict(), str(tmp_path / "model.safetensors"))
    bb = get_backbone("timm:resnet10t", weights=tmp_path / "model.safetensors")
    assert torch.equal(bb.trunk.layer4[0].conv2.weight, src.layer4[0].conv2.weight)
    bad = {k: v for k, v in src.state_dict().items() if not k.startswith("layer4.0.conv1")}
    with pytest.raises(WeightsError, match="missing keys: layer4.0.conv1.weight"):
        get_backbone("timm:resnet10t", weights=_save(bad, tmp_path / "bad.pth"))


# ---------------------------------------------------------------- bring your own

class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.pool(self.stages(self.stem(x)))


class _Stage(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


def test_a_list_of_stages_of_any_name_is_split_into_blocks():
    """A Sequential of composite stages that holds most of the trunk (timm PiT's
    ``transformers``) is one block per stage, as ``stages`` is: ``last=1`` is the last stage,
    not nearly all of the backbone. A Sequential of single layers, or a small one, stays whole."""
    trunk = nn.Sequential()
    trunk.add_module("embed", nn.Conv2d(3, 8, 3, padding=1))
    trunk.add_module("body", nn.Sequential(_Stage(8, 16), _Stage(16, 32), _Stage(32, 32)))
    trunk.add_module("norm", nn.BatchNorm2d(32))
    trunk.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    bb = from_module(trunk, input_spec={"image_size": 16})
    assert bb.block_names == ["embed", "body.0", "body.1", "body.2", "norm"]
    flat = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())  # single layers: one block
    assert from_module(flat, input_spec={"image_size": 16}).block_names == ["0", "1"]
    small = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Sequential(_Stage(64, 2), _Stage(2, 2)),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())  # a small neck beside a large stem: one block
    assert from_module(small, input_spec={"image_size": 16}).block_names == ["0", "1"]
    resnet_like = nn.Sequential()  # one list of stages per child (ResNet's layer1..layer4): each child is a block
    resnet_like.add_module("stem", nn.Conv2d(3, 8, 3, padding=1))
    resnet_like.add_module("layer1", nn.Sequential(_Stage(8, 8), _Stage(8, 8)))
    resnet_like.add_module("layer2", nn.Sequential(_Stage(8, 32), _Stage(32, 32)))
    resnet_like.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    assert from_module(resnet_like, input_spec={"image_size": 16}).block_names == ["stem", "layer1", "layer2"]
    trunk.add_module("pos", nn.ModuleList([nn.Sequential(nn.Conv2d(32, 32, 1)), nn.Sequential(nn.Conv2d(32, 32, 1))]))
    assert from_module(trunk, input_spec={"image_size": 16}, num_features=32).block_names == [
        "embed", "body.0", "body.1", "body.2", "norm", "pos"]  # a small list beside it (Twins' pos_block) is no matter


def test_an_image_backbone_that_does_not_take_3_channels_is_refused_before_the_data_are_read(tmp_path):
    """It was accepted, exported with parity, and then every image (read as RGB) failed with a
    raw convolution error at the first training step or prediction. A spectrogram backbone's
    image trunk may take one channel: its own input is audio."""
    from transferkit.backbones.spectrogram import spectrogram_backbone
    from transferkit.errors import ConfigError

    gray = nn.Sequential(nn.Conv2d(1, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    bb = from_module(gray, input_spec={"channels": 1, "mean": [0.5], "std": [0.25], "image_size": 16})
    with pytest.raises(ConfigError, match=r"says it takes 1-channel images \(its input_spec\).*read as 3-channel "
                                          r"RGB.*x.mean\(1"):
        tk.plan(bb, data=str(tmp_path / "none"))
    from transferkit.export import export_torchscript

    export_torchscript(tk.build_model(bb, 2).eval(), tmp_path / "gray.pt", example_inputs=torch.zeros(2, 1, 16, 16),
                       metadata={"labels": ["a", "b"], "input_spec": bb.input_spec.to_dict()})
    with pytest.raises(ConfigError, match=r"gray.pt' takes 1-channel images .*predict reads every image as 3-channel "
                                          r"RGB. Run the file yourself on \[N, 1, H, W\] tensors"):
        tk.load(tmp_path / "gray.pt")  # made by hand: its predict failed inside TorchScript
    audio = spectrogram_backbone(bb, sample_rate=8000, n_mels=32)
    assert audio.trunk(torch.zeros(2, 8000)).shape == (2, 8) and audio.input_spec.kind == "audio"

    class Gray(nn.Module):  # the way round the error gives
        def __init__(self):
            super().__init__()
            self.net = gray

        def forward(self, x):
            return self.net(x.mean(1, keepdim=True))

    assert from_module(Gray(), input_spec={"image_size": 16}).num_features == 8


def test_from_module_infers_width_and_blocks():
    bb = from_module(_Net(), input_spec={"image_size": 16}, name="mine")
    assert bb.num_features == 16 and bb.block_names == ["stem", "stages.0", "stages.2"]
    check_conventions(bb)
    custom = from_module(_Net(), blocks={"early": ["stem", "stages.0"], "late": ["stages.2"]}, num_features=16)
    assert custom.block_names == ["early", "late"]
    with pytest.raises(BackboneError, match="not in any block.*stages.2.weight"):
        from_module(_Net(), blocks=["stem", "stages.0"])
    with pytest.raises(BackboneError, match=r"returns \(2, 8, 16, 16\).*AdaptiveAvgPool2d"):
        from_module(nn.Conv2d(3, 8, 3, padding=1), input_spec={"image_size": 16})
    # an audio trunk's width comes from waveforms [N, T] (clip_seconds long, else 1 s), not from images
    frames = nn.Sequential(nn.Unflatten(1, (1, -1)), nn.Conv1d(1, 6, 400, stride=160), nn.AdaptiveAvgPool1d(1),
                           nn.Flatten())
    assert from_module(frames, input_spec={"kind": "audio", "sample_rate": 16000}).num_features == 6
    assert from_module(frames, input_spec={"kind": "audio", "sample_rate": 8000, "clip_seconds": 0.1}).num_features \
        == 6


def test_from_torchscript_is_a_frozen_extractor(tmp_path):
    torch.manual_seed(4)
    path = tmp_path / "extractor.pt"
    torch.jit.save(torch.jit.script(_Net()), str(path))
    bb = from_torchscript(path, input_spec={"image_size": 16})
    assert bb.num_features == 16 and bb.block_names == [] and bb.frozen
    script_round_trip(bb)
    from transferkit.model import build_model

    model = build_model(bb, 2)
    apply_policy(model, bb, Policy.parse("feature_extraction,bn=affine"))
    assert trainable_parameter_names(model) == {"head.0.weight", "head.0.bias"}
    with pytest.raises(PolicyError, match="no block that can train"):  # no policy trains a block of it
        apply_policy(model, bb, Policy.parse("full"))
    with pytest.raises(BackboneError, match="from_module"):
        from_torchscript(_Net())
    pooling = from_torchscript(torch.jit.script(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())),
                               input_spec={"image_size": 16})  # no parameter at all: nothing frozen, still taken
    assert pooling.num_features == 3 and pooling.block_names == [] and pooling.frozen == ()


def test_from_torchscript_of_a_transferkit_export_gives_its_trunk_at_its_input_spec(tmp_path):
    """An export given to from_torchscript was probed at 224 px and failed without saying why;
    with an input_spec its class scores became the features, and the new model normalised
    pixels the export normalised again. It gives the export's trunk, read at its input spec."""
    from transferkit.backbones.custom import EXPORT_METADATA
    from transferkit.export.metadata import METADATA_FILE
    from transferkit.export.torchscript import export_torchscript
    from transferkit.model import build_model

    assert EXPORT_METADATA == METADATA_FILE
    bb = get_backbone("tk:small_cnn", weights=None, image_size=24)
    x = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    export_torchscript(build_model(bb, 3).eval(), tmp_path / "m.pt", example_inputs=x,
                       metadata={"labels": ["a", "b", "c"], "input_spec": bb.input_spec.to_dict()})
    again = from_torchscript(tmp_path / "m.pt")
    assert again.input_spec == bb.input_spec and again.num_features == bb.num_features and again.frozen
    new = build_model(again, 5).eval()
    with torch.no_grad():
        assert torch.equal(new.features(x), torch.jit.load(str(tmp_path / "m.pt")).features(x))
        assert new(x).shape == (2, 5)
    # frozen by --optimize: the trunk is inlined into the model, and the advice to pass an input_spec took class
    # scores for features
    export_torchscript(build_model(bb, 3).eval(), tmp_path / "frozen.pt", example_inputs=x, optimize=True,
                       metadata={"labels": ["a", "b", "c"], "input_spec": bb.input_spec.to_dict()})
    with pytest.raises(BackboneError, match=r"frozen\.pt' is a transferkit export frozen by --optimize .* Export it "
                                            r"again without --optimize"):
        from_torchscript(tmp_path / "frozen.pt")


def test_a_block_without_parameters_is_refused_it_would_count_in_last_n():
    """``unfreeze:last=1`` on a block of pooling layers trained nothing, uncached, for every epoch."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(BackboneError, match=r"block \['pool'\] hold no parameter: nothing in them can train"):
        from_module(net, input_spec={"image_size": 16},
                    blocks=[("c1", ["0", "1"]), ("c2", ["2"]), ("pool", ["3", "4"])])
    ok = from_module(net, input_spec={"image_size": 16}, blocks=[("c1", ["0", "1"]), ("c2", ["2", "3", "4"])])
    assert ok.block_names == ["c1", "c2"]


def test_a_parameter_shared_by_modules_of_two_blocks_is_refused_and_within_one_block_taken():
    """Tied weights in blocks 'early' and 'late': unfreeze:last=1 trained the frozen block's weight
    (or, registered the other way, did not train the block the plan said trains)."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Conv2d(3, 3, 3, padding=1)
            self.early = nn.Conv2d(3, 3, 3, padding=1)
            self.early.weight = self.late.weight

        def forward(self, x):
            return self.late(torch.relu(self.early(x))).mean((2, 3))

    with pytest.raises(BackboneError, match=r"one parameter is shared by blocks \['early', 'late'\] \(as late.weight, "
                                            r"early.weight\).*Put the modules that share it in one block"):
        from_module(Tied(), input_spec={"image_size": 16}, blocks=["early", "late"])
    ok = from_module(Tied(), input_spec={"image_size": 16}, blocks=[("both", ["early", "late"])])
    assert ok.block_names == ["both"]


def test_a_policy_that_trains_blocks_is_refused_on_a_torchscript_backbone(tmp_path):
    """It has no block: "full" and gradual ran as feature extraction without a word (or with
    "raise epochs above 1" for fine_tune, and start=-1 advised for gradual)."""
    from conftest import make_image_folder

    data = str(make_image_folder(tmp_path / "d", per_class=3, size=16))
    bb = from_torchscript(torch.jit.script(_Net()), input_spec={"image_size": 16})
    for policy in ("full", "fine_tune", "gradual:every=1", "unfreeze:last=1"):
        with pytest.raises(PolicyError, match=r"The backbone has no block that can train \(a TorchScript backbone is "
                                              r"frozen whole.*Use policy='feature_extraction'"):
            tk.plan(bb, data=data, policy=policy, epochs=3)
    for policy in ("feature_extraction", "feature_extraction,bn=affine"):
        assert tk.plan(bb, data=data, policy=policy, epochs=3).cache


def test_timm_output_shape_real_and_fake_agree(monkeypatch):
    """A small model's pooled-output check runs one real image; a large one runs on fake
    tensors: both give the same shape (and a feature map is reported as one)."""
    import timm

    from transferkit.backbones import timm_source

    pooled = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    unpooled = timm.create_model("resnet10t", pretrained=False, num_classes=0, global_pool="")
    real = [timm_source.output_shape(m, img_size=64) for m in (pooled, unpooled)]
    monkeypatch.setattr(timm_source, "REAL_SHAPE_CHECK_PARAMS", 0)
    fake = [timm_source.output_shape(m, img_size=64) for m in (pooled, unpooled)]
    assert real == fake == [(1, 512), (1, 512, 2, 2)]


def test_a_weights_tag_is_checked_by_its_source_without_downloading():
    """What a dry run refuses: a tag the source does not list; a listed one passes unloaded."""
    from transferkit.backbones.registry import check_weights_tag

    for name, tag in [("tv:resnet18", "IMAGENET1K_V9"), ("timm:resnet10t", "no_such_tag"),
                      ("tk:small_cnn", "DEFAULT"), ("spec:tv:resnet18", "IMAGENET1K_V9"),
                      ("ta:wav2vec2_tiny", "DEFAULT"), ("ta:wav2vec2_base", "LARGE")]:  # ta: passed any tag
        with pytest.raises(WeightsError):
            check_weights_tag(name, tag)
    with pytest.raises(WeightsError, match="custom config"):
        check_weights_tag("ta:wav2vec2_base", "DEFAULT", config={"encoder_num_layers": 2})
    check_weights_tag("tv:resnet18", "IMAGENET1K_V1")
    check_weights_tag("timm:resnet10t", "DEFAULT")
    check_weights_tag("ta:wav2vec2_base", "DEFAULT")


def test_a_weights_file_that_torch_save_did_not_write_is_said_to_be_what_it_is(tmp_path):
    """A JPEG, an ONNX model or a text file given as weights said "The file holds Python objects
    beyond tensors; if you trust its source, load it with weights_only=False" (a text file: a
    raw KeyError), advice that is false there and unsafe; a dry run accepted them."""
    from transferkit.backbones.weights import check_weights_file
    from transferkit.errors import WeightsError

    cases = {"photo.jpg": (b"\xff\xd8\xff\xe0" + bytes(60), "a JPEG image"),
             "m.onnx": (b"\x08\x07\x12", "an ONNX model"), "notes.pth": (b"weights: none\n", "text"),
             "empty.pt": (b"", "empty (0 bytes)")}
    for name, (data, said) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsError, match=rf"is no file torch.save writes \(a zip archive, or an older pickle\): "
                                               rf"it is {re.escape(said)}\. Pass a state-dict file"):
            check_weights_file(tmp_path / name)
    torch.save({"w": torch.zeros(1)}, tmp_path / "ok.pt")
    assert check_weights_file(tmp_path / "ok.pt") == tmp_path / "ok.pt"
