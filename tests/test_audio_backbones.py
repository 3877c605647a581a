"""Speech (``ta:``) and spectrogram (``spec:``) backbones: blocks, policies, padding-aware
pooling, weights handling and TorchScript export parity with clips of different lengths."""

from __future__ import annotations

import re
import urllib.error
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

import transferkit as tk
from transferkit import Policy, WeightsError, apply_policy, build_model, get_backbone, list_backbones
from transferkit.backbones.custom import from_module
from transferkit.backbones.spectrogram import SpecAugment, spectrogram_backbone
from transferkit.errors import BackboneError
from transferkit.backbones.torchaudio_source import TINY
from transferkit.data.audio import pad_waveforms
from transferkit.export.torchscript import export_torchscript, load_scripted
from transferkit.policies import set_train_mode, trainable_parameter_names

SPEECH = ["ta:wav2vec2_tiny", "ta:wavlm_tiny"]
# A pre-norm variant (like the large models): LayerNorm in every CNN block, final norm after the last layer.
PRE_NORM = {"extractor_mode": "layer_norm", "encoder_layer_norm_first": True}


def _clips(*lengths: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(n, generator=g) for n in lengths]


def test_registry_lists_speech_and_spectrogram_backbones():
    names = list_backbones("ta:*")
    for n in ("ta:wav2vec2_base", "ta:hubert_base", "ta:wavlm_base", "ta:wav2vec2_large", "ta:hubert_large",
              "ta:wavlm_large", "ta:wav2vec2_tiny"):
        assert n in names
    assert "spec:tv:resnet18" in list_backbones("spec:*")


@pytest.mark.parametrize("name", SPEECH)
def test_speech_blocks_in_order_and_cover_parameters(name):
    bb = get_backbone(name, weights=None, layer_weighting="learned")
    # post-norm (base) models apply the encoder LayerNorm before the layers: it belongs to feature_projection
    assert bb.block_names == ["feature_extractor", "feature_projection", "layers.0", "layers.1", "layer_weights"]
    assert bb.block_of("encoder.transformer.layer_norm.weight") == "feature_projection"
    pre = get_backbone(name, weights=None, config=PRE_NORM)
    assert pre.block_names == ["feature_extractor", "feature_projection", "layers.0", "layers.1", "norm"]
    assert pre.block_of("encoder.transformer.layer_norm.weight") == "norm"
    owners = {p: bb.block_of(p) for p, _ in bb.trunk.named_parameters()}
    assert owners["layer_weights"] == "layer_weights"
    assert all(b in owners.values() for b in bb.block_names)
    assert bb.input_spec.kind == "audio" and bb.input_spec.sample_rate == 16000


def test_base_architecture_without_weights_has_twelve_layers():
    bb = get_backbone("ta:hubert_base", weights=None)
    assert bb.num_features == 768
    assert [b for b in bb.block_names if b.startswith("layers.")] == [f"layers.{i}" for i in range(12)]


@pytest.mark.parametrize("name,config", [(n, None) for n in SPEECH] + [("ta:wav2vec2_tiny", PRE_NORM)])
def test_pooled_features_ignore_padding(name, config):
    torch.manual_seed(0)
    trunk = get_backbone(name, weights=None, config=config).trunk.eval()
    a, b, c = _clips(3000, 1700, 2400)
    with torch.no_grad():
        batch = trunk(pad_waveforms([a, b, c]))
        alone = torch.cat([trunk(w[None]) for w in (a, b, c)])
    torch.testing.assert_close(batch, alone, atol=2e-5, rtol=1e-4)
    # Padding is not silence: zero-padding the short clip instead changes its features.
    with torch.no_grad():
        zero_padded = trunk(torch.nn.functional.pad(b, (0, 1300))[None])
    assert (zero_padded - alone[1]).abs().max() > 1e-3
    with torch.no_grad():  # a clip shorter than the CNN's receptive field still gives finite features
        short = trunk(pad_waveforms([a, a[:40]]))
        assert torch.isfinite(short).all()
        torch.testing.assert_close(trunk(a[None, :40]), short[1:], atol=2e-5, rtol=1e-4)  # alone: was a conv error
        for model in (trunk, torch.jit.script(trunk)):
            for empty in (torch.zeros(1, 0), pad_waveforms([a, a[:0]])):  # was a reshape error, or scored
                with pytest.raises((ValueError, torch.jit.Error), match="An audio clip holds no sample"):
                    model(empty)


def test_speech_trunk_matches_torchaudio_model_on_unpadded_clip(tmp_path):
    torch.manual_seed(1)
    ref = torchaudio.models.wav2vec2_model(**TINY["wav2vec2_tiny"][1]).eval()
    torch.save(ref.state_dict(), tmp_path / "ref.pt")  # torchaudio keys, weight norm included
    bb = get_backbone("ta:wav2vec2_tiny", weights=str(tmp_path / "ref.pt"))
    x = _clips(4000)[0][None]
    with torch.no_grad():
        expected = ref(x)[0].mean(1)
        torch.testing.assert_close(bb.trunk.eval()(x), expected, atol=1e-5, rtol=1e-4)


def test_learned_layer_weights_start_uniform_and_receive_gradient():
    torch.manual_seed(0)
    bb = get_backbone("ta:wav2vec2_tiny", weights=None, layer_weighting="learned")
    states, valid = bb.trunk.eval().hidden_states(pad_waveforms(_clips(2000, 1500)))
    assert len(states) == 3  # input of layer 0, layer 0 output, final output
    uniform = sum(states) / 3
    expected = (uniform * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True)
    out = bb.trunk(pad_waveforms(_clips(2000, 1500)))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    out.pow(2).sum().backward()
    assert bb.trunk.layer_weights.grad is not None and bb.trunk.layer_weights.grad.abs().sum() > 0


@pytest.mark.parametrize("policy,trainable", [
    ("feature_extraction", set()),
    ("unfreeze:last=2", {"layers.0", "layers.1"}),
    ("unfreeze:blocks=feature_projection+layers.0", {"feature_projection", "layers.0"}),
    ("full", {"feature_extractor", "feature_projection", "layers.0", "layers.1"}),
])
def test_policies_act_on_speech_blocks(policy, trainable):
    bb = get_backbone("ta:wav2vec2_tiny", weights=None)
    model = build_model(bb, 3)
    pol = Policy.parse(policy)
    apply_policy(model, bb, pol)
    set_train_mode(model, bb, pol)
    names = trainable_parameter_names(model)
    assert {bb.block_of(n[len("trunk."):]) for n in names if n.startswith("trunk.")} == trainable
    assert {n for n in names if n.startswith("head.")} == {"head.0.weight", "head.0.bias"}
    # A frozen block is in eval mode, so dropout and layer drop never touch it.
    for name, module in model.trunk.named_modules():
        owner = next((b for b in bb.blocks if name and b.owns(name)), None)
        if owner is not None and any(True for _ in module.parameters(recurse=False)):
            assert module.training == (owner.name in trainable), name
    x = pad_waveforms(_clips(1600, 1200))
    model(x).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in names), n


def test_frozen_feature_encoder_keeps_weights_bit_for_bit():
    torch.manual_seed(0)
    bb = get_backbone("ta:wav2vec2_tiny", weights=None)
    model = build_model(bb, 2)
    pol = Policy.parse("unfreeze:blocks=layers.0+layers.1")
    apply_policy(model, bb, pol)
    set_train_mode(model, bb, pol)
    before = {k: v.clone() for k, v in model.trunk.feature_extractor.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(pad_waveforms(_clips(1600, 1000))), torch.tensor([0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model.trunk.feature_extractor.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", SPEECH + ["spec:tk:small_cnn"])
def test_export_parity_with_clips_of_different_lengths(tmp_path, name):
    torch.manual_seed(0)
    kw = {"n_mels": 32} if name.startswith("spec:") else {}
    bb = get_backbone(name, weights=None, sample_rate=8000, **kw)
    model = build_model(bb, 3).eval()
    clips = _clips(4000, 2500, 1200, 3300, seed=3)
    x = pad_waveforms(clips)
    report = export_torchscript(model, tmp_path / "m.pt", example_inputs=x,
                                metadata={"labels": ["a", "b", "c"], "input_spec": bb.input_spec.to_dict()})
    assert report.mode == "script"
    scripted, meta = load_scripted(tmp_path / "m.pt")
    assert meta["input_spec"]["kind"] == "audio" and meta["input_spec"]["sample_rate"] == 8000
    with torch.no_grad():
        eager, exported = model(x), scripted(x)
        torch.testing.assert_close(exported, eager, atol=1e-5, rtol=1e-4)
        # each clip alone gives its row of the padded batch
        alone = torch.cat([scripted(c[None]) for c in clips])
        torch.testing.assert_close(alone, eager, atol=5e-5, rtol=1e-4)
        # int16 PCM goes through the same preprocessing
        pcm = (clips[0] * 32767).round().to(torch.int16)[None]
        torch.testing.assert_close(scripted(pcm), model(pcm.float() / 32768.0), atol=1e-5, rtol=1e-4)


def test_default_weights_offline_raise_weights_error_naming_file_and_cache(monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as err:
        get_backbone("ta:wav2vec2_base")
    msg = str(err.value)
    assert "wav2vec2_fairseq_base_ls960.pth" in msg and torch.hub.get_dir() in msg and "weights=None" in msg


def test_tiny_config_has_no_default_weights_and_loads_a_local_file(tmp_path):
    with pytest.raises(WeightsError, match="local state-dict file"):
        get_backbone("ta:wav2vec2_tiny")
    torch.manual_seed(5)
    src = get_backbone("ta:wav2vec2_tiny", weights=None, layer_weighting="learned")
    with torch.no_grad():
        src.trunk.layer_weights.copy_(torch.tensor([1.0, 2.0, 3.0]))
    torch.save(src.trunk.state_dict(), tmp_path / "w.pt")
    dst = get_backbone("ta:wav2vec2_tiny", weights=str(tmp_path / "w.pt"), layer_weighting="learned")
    for (k, a), (_, b) in zip(src.trunk.state_dict().items(), dst.trunk.state_dict().items()):
        assert torch.equal(a, b), k
    # A torchaudio state dict (Wav2Vec2Model keys) loads too.
    ref = torchaudio.models.wav2vec2_model(**TINY["wav2vec2_tiny"][1])
    torch.save(ref.state_dict(), tmp_path / "ta.pt")
    bb = get_backbone("ta:wav2vec2_tiny", weights=str(tmp_path / "ta.pt"))
    assert torch.equal(bb.trunk.encoder.feature_projection.projection.weight, ref.encoder.feature_projection.projection.weight)


def test_config_override_builds_random_architecture_and_refuses_default_weights():
    bb = get_backbone("ta:wav2vec2_tiny", weights=None, config={"encoder_num_layers": 3})
    assert [b for b in bb.block_names if b.startswith("layers.")] == ["layers.0", "layers.1", "layers.2"]
    with pytest.raises(WeightsError, match="custom config"):
        get_backbone("ta:hubert_base", config={"encoder_num_layers": 2})


def test_spectrogram_backbone_keeps_image_blocks_and_resamples_inside():
    img = get_backbone("tk:small_cnn", weights=None)
    bb = spectrogram_backbone(img, sample_rate=16000, input_sample_rate=8000, n_mels=32)
    assert bb.block_names == img.block_names and bb.name == "spec:tk:small_cnn"
    assert bb.input_spec.sample_rate == 8000 and bb.input_spec.kind == "audio"
    mel, frames = bb.trunk.log_mel(pad_waveforms(_clips(8000, 4000)))
    assert mel.shape[1] == 32 and frames.tolist() == [101, 51]  # 1 s and 0.5 s, hop 10 ms
    assert mel[1, :, 51:].abs().sum() == 0  # padding frames are neutral
    assert bb.trunk.eval()(pad_waveforms(_clips(8000, 4000))).shape == (2, img.num_features)


@pytest.mark.parametrize("clip_seconds", [None, 0.5])
def test_a_spectrogram_clip_gives_the_same_features_alone_as_in_any_batch_outside_training(clip_seconds):
    # the image trunk sees padding as zeros: outside training each length runs alone, shorter clips at clip_seconds
    torch.manual_seed(0)
    bb = spectrogram_backbone("tk:small_cnn", sample_rate=8000, n_mels=32, clip_seconds=clip_seconds)
    trunk = bb.trunk.eval()
    calls = []
    hook = trunk.image.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    clips = _clips(4000, 800, 12000, 800, 40, 3, seed=1)  # down to 3 samples: under the STFT's and the CNN's reach
    with torch.no_grad():
        alone = torch.cat([trunk(c[None]) for c in clips])
        calls.clear()
        batch = trunk(pad_waveforms(clips))
        # rows of one length run together; at clip_seconds every clip is padded or cut to 0.5 s
        assert calls == ([2, 2, 1, 1] if clip_seconds is None else [6])
        torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-4)
        hook.remove()
        torch.testing.assert_close(torch.jit.script(trunk)(pad_waveforms(clips)), batch, atol=1e-6, rtol=1e-5)
        trunk.image.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        calls.clear()
        trained = trunk.train()(pad_waveforms(clips))  # training: one batch (BatchNorm's statistics), padded
        assert calls == [6] and trained.shape == batch.shape and torch.isfinite(trained).all()
    assert trunk.min_samples > trunk.melspec.n_fft // 2 and f"min_samples={trunk.min_samples}" in repr(trunk)
    holed = pad_waveforms(clips)
    holed[0, 100] = float("nan")  # NaN marks padding: one inside a clip would cut it short
    fresh = spectrogram_backbone("tk:small_cnn", sample_rate=8000, n_mels=32, clip_seconds=clip_seconds).trunk.eval()
    for model in (fresh, torch.jit.script(fresh)):
        with pytest.raises((ValueError, torch.jit.Error), match="holds NaN before its end"):
            model(holed)
        for empty in (torch.zeros(1, 0), pad_waveforms([clips[0], clips[0][:0]])):  # was scored as any clip
            with pytest.raises((ValueError, torch.jit.Error), match="An audio clip holds no sample"):
                model(empty)
        for sign in (1, -1):  # scored NaN without a word
            with pytest.raises((ValueError, torch.jit.Error), match=r"holds an infinite sample .*nan_to_num"):
                model(torch.cat([clips[0][:50], torch.tensor([sign * float("inf")]), clips[0][50:]])[None])
    fresh.train()(holed)  # training reads clips the loader padded: not checked (the check waits for the device)
    with pytest.raises(BackboneError, match="runs on no log-mel image of 2 mel bands"):  # too few bands to pool
        spectrogram_backbone("tk:small_cnn", sample_rate=8000, n_mels=2)


def test_spec_augment_masks_only_in_training_mode():
    torch.manual_seed(0)
    bb = spectrogram_backbone("tk:small_cnn", sample_rate=8000, n_mels=32,
                              spec_augment=dict(freq_masks=2, freq_width=8, time_masks=2, time_width=10))
    x = pad_waveforms(_clips(4000, 4000))
    sa = bb.trunk.spec_augment
    mel, frames = bb.trunk.log_mel(x)
    assert torch.equal(sa.eval()(mel, frames), mel)
    masked = sa.train()(mel, frames)
    assert (masked == 0).sum() > (mel == 0).sum()
    assert isinstance(sa, SpecAugment)


def test_spec_augment_with_a_backbone_frozen_all_run_is_said_to_do_nothing(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(4):
            sf.write(tmp_path / label / f"{i}.wav", 0.1 * rng.standard_normal(2000), 8000)
    kw = dict(weights=None, data=tmp_path, epochs=2, verbose=False, device="cpu",
              backbone_options={"sample_rate": 8000, "n_mels": 16, "spec_augment": True})
    said = [n for n in tk.plan("spec:tk:small_cnn", policy="feature_extraction", **kw).notes if "spec_augment" in n]
    assert len(said) == 1 and "masks in training mode only, and no block of the backbone trains" in said[0]
    said = [n for n in tk.plan("spec:tk:small_cnn", policy="feature_extraction,bn=affine", **kw).notes
            if "spec_augment" in n]  # gamma/beta train, every block in eval mode: no mask either (was: not said)
    assert len(said) == 1 and "(BatchNorm gamma/beta train under bn=affine, with the blocks in eval mode)" in said[0]
    for policy in ("full", "fine_tune"):  # the backbone trains in some epoch: the masks act there
        assert not [n for n in tk.plan("spec:tk:small_cnn", policy=policy, **kw).notes if "spec_augment" in n]
    off = {**kw, "backbone_options": {**kw["backbone_options"], "spec_augment": None}}
    assert not [n for n in tk.plan("spec:tk:small_cnn", policy="feature_extraction", **off).notes
                if "spec_augment" in n]


@pytest.mark.parametrize("name", ["spec:tk:small_cnn", "ta:wav2vec2_tiny"])
@pytest.mark.parametrize("seconds", [0.001, 0, -1, float("nan"), True])
def test_clip_and_window_lengths_below_what_an_audio_model_takes_are_refused_before_anything_runs(name, seconds):
    """A 1 ms clip trained and exported a model fed 8 samples (or failed in the first
    convolution); 0 meant "no clip" in training and failed the export. Every audio length is
    a number of seconds of at least 25 ms, or None."""
    with pytest.raises(tk.ConfigError, match=r"clip_seconds must be a number of seconds of at least 0.025"):
        tk.get_backbone(name, weights=None, clip_seconds=seconds)
    with pytest.raises(tk.ConfigError, match=r"max_seconds=.*(at least 0.025|not a finite|type bool)"):
        tk.FinetuneConfig(backbone=name, data="clips", max_seconds=seconds)
    with pytest.raises(tk.ConfigError, match=r"input_spec.clip_seconds must be"):
        from_module(torch.nn.Sequential(torch.nn.Unflatten(1, (1, -1)), torch.nn.Conv1d(1, 4, 9),
                                        torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten()),
                    input_spec={"kind": "audio", "sample_rate": 8000, "clip_seconds": seconds})
    assert tk.get_backbone(name, weights=None, clip_seconds=0.025).input_spec.clip_seconds == 0.025


def test_a_backbone_object_s_clip_length_is_checked_and_numpy_lengths_are_kept_as_python_numbers(tmp_path):
    """A Backbone whose spec was replaced reached training unchecked (-1 trained); a NumPy length
    (np.percentile of clip durations) went into checkpoints, which then could not be loaded."""
    import dataclasses

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            sf.write(tmp_path / label / f"{i}.wav", 0.1 * rng.standard_normal(2000), 8000)
    bb = spectrogram_backbone("tk:small_cnn", sample_rate=8000, n_mels=16)
    bad = dataclasses.replace(bb, input_spec=bb.input_spec.replace(clip_seconds=-1.0))
    with pytest.raises(tk.ConfigError, match=r"spec:tk:small_cnn's input_spec.clip_seconds must be a number of "
                                             r"seconds of at least 0.025"):
        tk.plan(bad, data=tmp_path, epochs=1, verbose=False)
    spec = spectrogram_backbone("tk:small_cnn", sample_rate=8000, n_mels=16, clip_seconds=np.float64(0.25)).input_spec
    assert type(spec.clip_seconds) is float and spec.clip_seconds == 0.25
    r = tk.finetune(spectrogram_backbone("tk:small_cnn", sample_rate=8000, n_mels=16, clip_seconds=np.float64(0.25)),
                    data=tmp_path, epochs=1, verbose=False, num_workers=0, checkpoint=tmp_path / "run.pt")
    assert torch.load(tmp_path / "run.pt", weights_only=True)["transferkit"]["decisions"]["input_spec"][
        "clip_seconds"] == 0.25 and r.history


def test_image_settings_are_refused_for_an_audio_backbone_by_the_dry_run_as_by_the_run(tmp_path):
    """The dry run approved augment='flip' (the run then failed after printing its plan), and
    image_size was ignored without a word."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            sf.write(tmp_path / label / f"{i}.wav", 0.1 * rng.standard_normal(2000), 8000)
    kw = dict(weights=None, data=tmp_path, epochs=1, verbose=False, device="cpu", num_workers=0,
              backbone_options={"sample_rate": 8000})
    for run in (tk.plan, tk.finetune):
        with pytest.raises(tk.ConfigError, match=r"augment='flip' is an image augmentation; ta:wav2vec2_tiny takes "
                                                 r"audio, whose augmentations are 'none', 'standard'"):
            run("ta:wav2vec2_tiny", augment="flip", **kw)
        with pytest.raises(tk.ConfigError, match=r"image_size=64 applies to image backbones; ta:wav2vec2_tiny takes "
                                                 r"audio"):
            run("ta:wav2vec2_tiny", image_size=64, **kw)
    assert tk.plan("ta:wav2vec2_tiny", augment="standard", **kw).augment == "standard"


def test_spec_augment_masks_while_some_block_trains_though_it_sits_outside_every_block():
    """SpecAugment, the resampler and the mel frontend belong to no block: they must not follow a
    frozen block into eval mode (the masks would silently stop under unfreeze:last=1)."""
    from transferkit.policies.freeze import set_train_mode

    bb = spectrogram_backbone("tk:small_cnn", sample_rate=8000, n_mels=16, spec_augment=True)
    model = build_model(bb, 2)
    for policy, masks in (("unfreeze:last=1", True), ("full", True), ("feature_extraction", False)):
        set_train_mode(model, bb, Policy.parse(policy))
        assert model.trunk.spec_augment.training is masks, policy


def test_a_model_at_an_odd_input_rate_resamples_as_the_data_do_and_stores_no_kernel(tmp_path):
    """The resampler inside the model filtered by the exact rate ratio: at 22254 Hz its kernel
    (357 MB) took seconds to build and was stored in every checkpoint and export. It now uses
    the data's ratio (`resample_ratio`) and is rebuilt from the rates, never stored."""
    from transferkit.data.audio import resample

    bb = get_backbone("spec:tk:small_cnn", weights=None, input_sample_rate=22254, n_mels=16)
    assert not [k for k in bb.trunk.state_dict() if "resample" in k]
    assert bb.trunk.resample.kernel.numel() < 10**6
    at_16k = get_backbone("spec:tk:small_cnn", weights=None, n_mels=16)
    at_16k.trunk.load_state_dict(bb.trunk.state_dict())
    wav = 0.1 * torch.randn(1, 22254, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(bb.trunk.eval()(wav), at_16k.trunk.eval()(resample(wav, 22254, 16000)),
                                   rtol=0, atol=1e-4)
    # a file of an earlier version holds the kernel: it is rebuilt, not read (also as weights=, the export's path)
    old = {**bb.trunk.state_dict(), "resample.kernel": torch.zeros(3)}
    bb.trunk.load_state_dict(old)
    assert bb.trunk.resample.kernel.numel() > 3
    torch.save(old, tmp_path / "old.pt")
    again = get_backbone("spec:tk:small_cnn", weights=str(tmp_path / "old.pt"), input_sample_rate=22254, n_mels=16)
    assert again.trunk.resample.kernel.numel() > 3
    # rates whose ratio within the limit is 1 are not resampled, as the data are not
    near = get_backbone("spec:tk:small_cnn", weights=None, input_sample_rate=16001, n_mels=16)
    assert isinstance(near.trunk.resample, torch.nn.Identity) and near.trunk.ratio == 1.0


@pytest.mark.parametrize("name, options", [("spec:tk:small_cnn", {"input_sample_rate": 11127, "n_mels": 16}),
                                           ("ta:wav2vec2_tiny", {"sample_rate": 11127})])
def test_a_run_s_checkpoint_loads_back_as_its_backbone_s_weights(tmp_path, name, options):
    """A spec: run's checkpoint went to its image backbone (25 missing keys), and a ta: run's at
    a rate other than 16 kHz held the resampling kernel (an unexpected key): neither trained
    further from ``weights=run.pt`` as the docs say."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "d" / label).mkdir(parents=True)
        for i in range(3):
            sf.write(tmp_path / "d" / label / f"{i}.wav", 0.1 * rng.standard_normal(3000), 11127)
    r = tk.finetune(name, weights=None, backbone_options=options, data=tmp_path / "d", epochs=1, verbose=False,
                    num_workers=0, policy="full", val_split=0, checkpoint=tmp_path / "run.pt")
    trained = {k[len("trunk."):]: v for k, v in r.model.state_dict().items() if k.startswith("trunk.")}
    again = get_backbone(name, weights=str(tmp_path / "run.pt"), **options)
    assert again.trunk.state_dict().keys() == trained.keys()
    for k, v in again.trunk.state_dict().items():
        assert torch.equal(v, trained[k]), k
    tk.finetune(name, weights=str(tmp_path / "run.pt"), backbone_options=options, data=tmp_path / "d", epochs=1,
                verbose=False, num_workers=0, val_split=0)
    if name.startswith("spec:"):  # made with other mel settings: said, not loaded into a filterbank of others
        with pytest.raises(tk.ConfigError, match=r"holds a spectrogram trunk made with other mel settings "
                                                 r"\(melspec.mel_scale.fb"):
            get_backbone(name, weights=str(tmp_path / "run.pt"), **{**options, "f_max": 3000.0})


@pytest.mark.parametrize("option, value", [("hop_length", 0), ("hop_length", -5), ("hop_length", 2.5),
                                           ("n_fft", 0), ("image_size", 0), ("image_size", (32, -3)),
                                           ("n_mels", True)])
def test_spectrogram_settings_that_are_no_positive_whole_number_are_refused_when_built(option, value):
    """0 fell back to the default, 2.5 was cut to 2, and -5 failed inside training with torch's
    stft error."""
    with pytest.raises(tk.ConfigError, match=f"{option} must be a positive whole number"):
        get_backbone("spec:tk:small_cnn", weights=None, **{option: value})


def test_more_mel_bands_than_the_spectrum_resolves_is_said_with_what_fits():
    """n_mels=256 at 8 kHz (n_fft 256: 129 bins) built a trunk whose empty bands are rows of the
    log-mel image that never change, with only torchaudio's warning, which says neither how
    many nor what fits."""
    with pytest.warns(UserWarning) as seen:
        get_backbone("spec:tk:small_cnn", weights=None, sample_rate=8000, n_mels=256)
    said = [str(w.message) for w in seen]
    assert len(said) == 1 and re.fullmatch(r"n_mels=256 is more mel bands than n_fft=256 resolves at 8000 Hz: \d+ of "
                                           r"them hold no frequency bin \(an FFT of 256 samples has 129\), rows of "
                                           r"the log-mel image that never change\. Use n_mels <= \d+ or "
                                           r"n_fft >= \d+\.", said[0]), said
    wider = int(said[0].rpartition(">= ")[2].rstrip("."))
    with warnings.catch_warnings():  # the n_fft it names resolves the bands
        warnings.simplefilter("error")
        get_backbone("spec:tk:small_cnn", weights=None, sample_rate=8000, n_mels=256, n_fft=wider)
    # no band resolved: the log-mel image was the same for every sound, and the advice was n_mels <= 0
    with pytest.raises(tk.ConfigError, match=r"n_fft=3 resolves none of the n_mels=64 mel bands at 16000 Hz: .* the "
                                             r"log-mel image is the same for every sound\. Use n_fft >= \d+\.$"):
        get_backbone("spec:tk:small_cnn", weights=None, n_fft=3, sample_rate=16000, n_mels=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_backbone("spec:tk:small_cnn", weights=None, sample_rate=8000, n_mels=64)
        get_backbone("spec:tk:small_cnn", weights=None, sample_rate=16000, n_mels=128)  # one empty band: not said


def test_a_hop_longer_than_the_frame_says_how_much_of_each_clip_the_model_hears():
    """hop_length=4000 with n_fft=256 at 8 kHz trained without a word on 2 windows of 256 samples
    of a 0.8 s clip (8 % of the sound)."""
    with pytest.warns(UserWarning, match=r"hop_length=1024 is larger than n_fft=256: the spectrogram's frames leave "
                                         r"768 samples out between each two, so the model hears 25% of each clip\. "
                                         r"Use hop_length <= 256"):
        get_backbone("spec:tk:small_cnn", weights=None, sample_rate=8000, n_mels=16, n_fft=256, hop_length=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_backbone("spec:tk:small_cnn", weights=None, sample_rate=8000, n_mels=16, n_fft=256, hop_length=256)


def test_an_exported_clip_seconds_model_keeps_a_long_clips_middle_as_the_predictor_does(tmp_path):
    """A model of clip_seconds=0.5 ran a longer clip whole in its exported file, where training
    and the predictor keep its middle 0.5 s: a caller of the file without transferkit got other
    scores (on FSDD: 2 of 7 top-1 labels differed)."""
    torch.manual_seed(0)
    bb = spectrogram_backbone("tk:small_cnn", sample_rate=8000, n_mels=32, clip_seconds=0.5)
    model = build_model(bb, 3).eval()
    long, short = _clips(10401, 2500, seed=2)
    export_torchscript(model, tmp_path / "m.pt", example_inputs=pad_waveforms([long, short]),
                       metadata={"labels": ["a", "b", "c"], "input_spec": bb.input_spec.to_dict()})
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    middle = long[(10401 - 4000) // 2:][:4000]
    with torch.no_grad():
        want = model(pad_waveforms([middle, short]))
        for m in (model, scripted):
            torch.testing.assert_close(m(pad_waveforms([long, short])), want, atol=1e-6, rtol=1e-5)
    sf.write(tmp_path / "long.wav", long.numpy(), 8000, subtype="FLOAT")
    with pytest.warns(UserWarning, match="cropped to its middle 0.5 s"):
        probs = tk.load(tmp_path / "m.pt").predict_proba([str(tmp_path / "long.wav")])
    torch.testing.assert_close(torch.as_tensor(probs[0]).float(), want[0].softmax(-1), atol=1e-5, rtol=1e-4)
