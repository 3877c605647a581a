"""Self-supervised speech backbones from ``torchaudio.pipelines`` (``ta:``): wav2vec 2.0,
HuBERT and WavLM, base and large.

The trunk takes a float waveform batch ``[N, T]`` at the declared sample rate, clips
shorter than T padded at the end with NaN (``transferkit.data.audio.pad_waveforms``);
each clip's valid length is read from the padding, so one tensor carries waveforms and
lengths through training, feature caching and the exported file. Everything is
padding-aware: the first GroupNorm of the CNN encoder, the attention and the pooled mean
use only valid samples/frames, so a clip gives the same features alone or padded in a
batch (within float error).

Blocks: ``feature_extractor`` (the CNN), ``feature_projection`` (projection + positional
convolution), ``layers.0 .. layers.N-1``, ``norm`` (the final LayerNorm of pre-norm
"large" models; post-norm "base" models apply it after the positional convolution, in
``feature_projection``), and ``layer_weights`` when ``layer_weighting="learned"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torchaudio
from torch import Tensor, nn
from torch.nn.utils import parametrize

from transferkit.config import check_seconds, sample_rate_of
from transferkit.backbones._base import Backbone, InputSpec, blocks_from_members, check_blocks
from transferkit.backbones._hub import hub_unreachable
from transferkit.backbones.registry import register_source
from transferkit.backbones.spectrogram import SpecAugment, as_spec_augment, resampler, split_padding
from transferkit.backbones.weights import is_weights_path, load_into, read_state_dict
from transferkit.errors import ConfigError, WeightsError, check_choice

BUNDLES = {
    "wav2vec2_base": "WAV2VEC2_BASE", "wav2vec2_large": "WAV2VEC2_LARGE",
    "wav2vec2_large_lv60k": "WAV2VEC2_LARGE_LV60K", "wav2vec2_xlsr53": "WAV2VEC2_XLSR53",
    "hubert_base": "HUBERT_BASE", "hubert_large": "HUBERT_LARGE", "hubert_xlarge": "HUBERT_XLARGE",
    "wavlm_base": "WAVLM_BASE", "wavlm_base_plus": "WAVLM_BASE_PLUS", "wavlm_large": "WAVLM_LARGE",
}
_TINY = dict(extractor_mode="group_norm", extractor_conv_layer_config=[(32, 10, 5), (32, 3, 2), (32, 3, 2), (32, 2, 2)],
             extractor_conv_bias=False, encoder_embed_dim=32, encoder_projection_dropout=0.0,
             encoder_pos_conv_kernel=8, encoder_pos_conv_groups=4, encoder_num_layers=2, encoder_num_heads=2,
             encoder_attention_dropout=0.0, encoder_ff_interm_features=64, encoder_ff_interm_dropout=0.0,
             encoder_dropout=0.0, encoder_layer_norm_first=False, encoder_layer_drop=0.0, aux_num_out=None)
# Tiny random-init configurations (no weights exist) for tests, docs and quick experiments.
TINY = {"wav2vec2_tiny": ("Wav2Vec2", _TINY),
        "wavlm_tiny": ("WavLM", {**_TINY, "encoder_num_buckets": 16, "encoder_max_distance": 64})}
LAYER_WEIGHTINGS = ("last", "learned")


def masked_mean(x: Tensor, valid: Tensor, dim: int) -> Tensor:
    """Mean of ``x`` over ``dim`` counting only positions where ``valid`` (broadcastable) is True."""
    v = valid.to(x.dtype)
    return (x * v).sum(dim, keepdim=True) / v.sum(dim, keepdim=True).clamp_min(1.0)


class MaskedConvBlock(nn.Module):
    """A wav2vec2 CNN block (conv -> norm -> GELU) whose per-channel GroupNorm statistics
    use only the valid frames. Keeps torchaudio's child names (``conv``, ``layer_norm``)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.conv, self.layer_norm = block.conv, block.layer_norm
        self.kernel_size, self.stride = int(block.kernel_size), int(block.stride)
        self.group_norm = isinstance(block.layer_norm, nn.GroupNorm)
        if self.group_norm and block.layer_norm.num_groups != block.layer_norm.num_channels:
            raise ConfigError("Padding-aware GroupNorm needs num_groups == num_channels (as in wav2vec2).")

    def forward(self, x: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
        x = self.conv(x)
        length = torch.clamp(torch.div(length - self.kernel_size, self.stride, rounding_mode="floor") + 1, min=0)
        if self.layer_norm is not None:
            if self.group_norm:
                valid = (torch.arange(x.shape[-1], device=x.device).unsqueeze(0) < length.unsqueeze(1)).unsqueeze(1)
                mean = masked_mean(x, valid, 2)
                var = masked_mean((x - mean).pow(2), valid, 2)
                x = (x - mean) / torch.sqrt(var + self.layer_norm.eps)
                x = x * self.layer_norm.weight.view(1, -1, 1) + self.layer_norm.bias.view(1, -1, 1)
            else:
                x = self.layer_norm(x)
        return nn.functional.gelu(x), length


class MaskedFeatureExtractor(nn.Module):
    """torchaudio's CNN feature extractor with padding-aware blocks (same parameter names)."""

    def __init__(self, conv_layers: nn.ModuleList) -> None:
        super().__init__()
        self.conv_layers = nn.ModuleList([MaskedConvBlock(b) for b in conv_layers])
        self.receptive_field = 1  # the fewest samples that make one frame (400 for wav2vec2)
        for block in reversed(self.conv_layers):
            self.receptive_field = (self.receptive_field - 1) * block.stride + block.kernel_size

    def forward(self, x: Tensor, length: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[-1] < self.receptive_field:  # a batch of clips all shorter than it: padded (masked by length)
            x = nn.functional.pad(x, [0, self.receptive_field - x.shape[-1]])
        h = x.unsqueeze(1)
        for layer in self.conv_layers:
            h, length = layer(h, length)
        return h.transpose(1, 2), length


class SpeechTrunk(nn.Module):
    """A torchaudio wav2vec2-family model as a padding-aware trunk: ``[N, T]`` -> ``[N, D]``.

    Parameter names match torchaudio's ``Wav2Vec2Model`` (``feature_extractor.*``,
    ``encoder.*``), so bundle state dicts load as they are.
    """

    def __init__(self, model: nn.Module, *, wavlm: bool, normalize_waveform: bool, layer_weighting: str,
                 input_sample_rate: int, sample_rate: int, spec_augment: SpecAugment | None) -> None:
        super().__init__()
        check_choice("layer_weighting", layer_weighting, LAYER_WEIGHTINGS)
        _remove_weight_norm(model.encoder.transformer.pos_conv_embed)
        self.feature_extractor = MaskedFeatureExtractor(model.feature_extractor.conv_layers)
        self.encoder = model.encoder
        t = model.encoder.transformer
        self.wavlm, self.normalize_waveform = wavlm, normalize_waveform
        self.layer_norm_first, self.layer_drop = bool(t.layer_norm_first), float(t.layer_drop)
        self.learned_weights = layer_weighting == "learned"
        self.layer_weights = nn.Parameter(torch.zeros(len(t.layers) + 1)) if self.learned_weights else None
        self.resample, self.ratio = resampler(input_sample_rate, sample_rate)
        self.spec_augment = spec_augment or SpecAugment(freq_masks=0, time_masks=0)

    def frames(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """CNN features ``[N, frames, C]`` and valid frames per clip."""
        x, lengths = split_padding(x, check=not self.training)
        if self.ratio != 1.0:
            x = self.resample(x)
            lengths = torch.ceil(lengths.to(torch.float64) * self.ratio).to(lengths.dtype)
        if self.normalize_waveform:  # per clip, over its valid samples (fairseq's normalize=True)
            valid = torch.arange(x.shape[-1], device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
            mean = masked_mean(x, valid, 1)
            var = masked_mean((x - mean).pow(2), valid, 1)
            x = torch.where(valid, (x - mean) / torch.sqrt(var + 1e-5), torch.zeros_like(x))
        return self.feature_extractor(x, lengths)

    def hidden_states(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """The input of the first transformer layer, then each layer's output (the last one
        after the final norm), and the valid frames ``[N, frames]`` mask."""
        h, lengths = self.frames(x)
        lengths = torch.clamp(lengths, min=1)  # a clip shorter than the CNN's receptive field keeps one frame
        t = self.encoder.transformer
        h = self.encoder.feature_projection(h)
        valid = torch.arange(h.shape[1], device=h.device).unsqueeze(0) < lengths.unsqueeze(1)
        h = h.masked_fill(~valid.unsqueeze(-1), 0.0)
        h = self.spec_augment(h.transpose(1, 2), lengths).transpose(1, 2)
        h = h + t.pos_conv_embed(h)
        if self.layer_norm_first:
            h = t.layer_norm(h)
        h = t.dropout(h)
        n, frames = valid.shape
        mask: torch.Tensor | None = None
        if not self.wavlm:
            mask = (-10000.0 * (~valid).to(h.dtype)).view(n, 1, 1, frames).expand(n, 1, frames, frames)
        pad_bias = torch.zeros(n, frames, dtype=h.dtype, device=h.device).masked_fill(~valid, float("-inf"))
        states = [h]
        position_bias: torch.Tensor | None = None
        for layer in t.layers:
            if not (layer.training and self.layer_drop > 0.0 and torch.rand(1).item() <= self.layer_drop):
                h, position_bias = layer(h, mask, position_bias=position_bias, key_padding_mask=pad_bias)
            states.append(h)
        if not self.layer_norm_first:
            states[-1] = t.layer_norm(states[-1])
        return states, valid

    def forward(self, x: Tensor) -> Tensor:
        states, valid = self.hidden_states(x)
        if self.layer_weights is not None:
            w = torch.softmax(self.layer_weights, 0)
            h = (torch.stack(states, 0) * w.view(-1, 1, 1, 1)).sum(0)
        else:
            h = states[-1]
        return masked_mean(h, valid.unsqueeze(-1), 1).squeeze(1)


def _remove_weight_norm(pos_conv: nn.Module) -> None:
    """Fold the positional convolution's weight norm into a plain weight (same function).

    A weight-normed conv is a parametrized module whose dynamically created class is shared
    by deep copies; scripting a copy removes the parametrization from that shared class and
    breaks the original. A plain weight trains the same function and scripts cleanly."""
    if parametrize.is_parametrized(pos_conv.conv, "weight"):
        parametrize.remove_parametrizations(pos_conv.conv, "weight", leave_parametrized=True)


def _is_torchaudio_format(sd: dict[str, Tensor]) -> bool:
    return any(".parametrizations.weight." in k for k in sd)


def _blocks(trunk: SpeechTrunk):
    pre = ["encoder.feature_projection", "encoder.transformer.pos_conv_embed", "encoder.transformer.dropout"]
    spec = [("feature_extractor", ["feature_extractor"]),
            ("feature_projection", pre + (["encoder.transformer.layer_norm"] if trunk.layer_norm_first else []))]
    spec += [(f"layers.{i}", [f"encoder.transformer.layers.{i}"]) for i in range(len(trunk.encoder.transformer.layers))]
    if not trunk.layer_norm_first:
        spec.append(("norm", ["encoder.transformer.layer_norm"]))
    if trunk.layer_weights is not None:
        spec.append(("layer_weights", ["layer_weights"]))
    return blocks_from_members(spec)


def _bundle_url(bundle: Any) -> str:
    path = bundle._path
    return path if path.startswith("https") else f"https://download.pytorch.org/torchaudio/models/{path}"


def _download_state_dict(name: str, bundle: Any) -> dict[str, Tensor]:
    url = _bundle_url(bundle)
    cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    advice = (f"If you are offline, download that file on a machine with internet and put it at {cache}, or pass "
              "its local path as weights=..., or use weights=None for random initialisation.")
    offline = None if os.path.isfile(cache) else hub_unreachable(url)  # once per process, about a second at most
    if offline is not None:
        raise WeightsError(f"Could not get the pretrained weights of ta:{name} ({url}): {offline}. {advice}")
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False)
    except Exception as exc:  # URLError (offline), HTTPError, a truncated cache file ...
        raise WeightsError(f"Could not get the pretrained weights of ta:{name} ({url}): {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}. {advice}") from exc


def _load_file(target: nn.Module, sd: dict[str, Tensor], path: Any, *, strict: bool) -> None:
    """Load a torchaudio ``Wav2Vec2Model`` state dict (into the model) or a transferkit
    trunk state dict (into the trunk; ``layer_weights`` optional)."""
    sd = dict(sd)
    lw = sd.pop("layer_weights", None)
    core = nn.ModuleDict({"feature_extractor": target.feature_extractor, "encoder": target.encoder})
    # the resampling kernel follows from the rates (a file of an earlier version holds it)
    load_into(core, sd, strict=strict, ignore=("aux", "resample"), source=f"Weights file {str(path)!r}")
    own = getattr(target, "layer_weights", None)
    if lw is not None and own is not None and lw.shape == own.shape:
        with torch.no_grad():
            own.copy_(lw)


class TorchaudioSource:
    """``ta:<name>``: the wav2vec2/HuBERT/WavLM bundles of `BUNDLES` and the tiny
    random-init configurations of `TINY`."""

    prefix = "ta"

    def names(self) -> list[str]:
        return list(BUNDLES) + list(TINY)

    def check_weights(self, name: str, weights: Any, *, config: dict[str, Any] | None = None, **_: Any) -> None:
        """Refuse a weights tag ``ta:<name>`` cannot resolve: ``DEFAULT`` is a bundle's published
        weights, which a tiny configuration (random init) and a custom ``config`` have none of."""
        if weights is None or is_weights_path(weights) or name not in (*BUNDLES, *TINY):
            return  # (an unknown name is said as such when it is built)
        downloadable = name in BUNDLES and not config
        if weights != "DEFAULT" or not downloadable:
            why = f"ta:{name} with a custom config" if config else f"ta:{name}"
            raise WeightsError(f"weights={weights!r} cannot be resolved for {why}: valid values are "
                               f"{repr('DEFAULT') + ', ' if downloadable else ''}a local state-dict file, or None.")

    def build(self, name: str, *, weights: Any = "DEFAULT", config: dict[str, Any] | None = None,
              sample_rate: int | None = None, layer_weighting: str = "last", spec_augment: Any = None,
              clip_seconds: float | None = None, weights_only: bool = True, strict: bool = True) -> Backbone:
        """Build ``ta:<name>``. ``config`` overrides torchaudio's architecture parameters
        (random init only: ``weights`` must be None or a file). ``sample_rate`` is the rate of
        the waveforms the model takes (resampled inside to the model's 16 kHz)."""
        clip_seconds = check_seconds(clip_seconds, "clip_seconds")
        if sample_rate is not None:  # 0 would read as "the model's own", 8000.5 as 8000
            sample_rate = sample_rate_of(sample_rate, "backbone option sample_rate", ConfigError)
        if name in TINY:
            model_type, params = TINY[name]
            bundle, native_rate, normalize = None, 16000, False
        else:
            bundle = getattr(torchaudio.pipelines, BUNDLES[name])
            model_type, params = bundle._model_type, dict(bundle._params)
            native_rate, normalize = int(bundle.sample_rate), bool(bundle._normalize_waveform)
        if config:
            params = {**params, **config}
        self.check_weights(name, weights, config=config)
        factory = torchaudio.models.wavlm_model if model_type == "WavLM" else torchaudio.models.wav2vec2_model
        try:
            model = factory(**params)
        except TypeError as exc:
            raise ConfigError(f"Invalid config for ta:{name}: {exc}. Keys are torchaudio.models."
                              f"{factory.__name__} arguments.") from exc
        file_sd = None
        if weights == "DEFAULT":
            model.load_state_dict(_download_state_dict(name, bundle))
        elif weights is not None:
            file_sd = read_state_dict(weights, weights_only=weights_only)
            if _is_torchaudio_format(file_sd):  # keys of torchaudio's model, weight norm included
                _load_file(model, file_sd, weights, strict=strict)
                file_sd = None
        trunk = SpeechTrunk(model, wavlm=model_type == "WavLM", normalize_waveform=normalize,
                            layer_weighting=layer_weighting, input_sample_rate=int(sample_rate or native_rate),
                            sample_rate=native_rate, spec_augment=as_spec_augment(spec_augment))
        if file_sd is not None:
            _load_file(trunk, file_sd, weights, strict=strict)
        blocks = _blocks(trunk)
        check_blocks(trunk, blocks, name=f"ta:{name}")
        desc = None if weights is None else (_bundle_url(bundle) if weights == "DEFAULT" else str(Path(weights)))
        spec = InputSpec(kind="audio", sample_rate=int(sample_rate or native_rate), clip_seconds=clip_seconds,
                         channels=1)
        return Backbone(name=f"ta:{name}", trunk=trunk, num_features=int(params["encoder_embed_dim"]),
                        blocks=blocks, input_spec=spec, weights=desc)


register_source(TorchaudioSource())
