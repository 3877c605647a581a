"""Weights requests fail fast when the hub cannot be reached.

Before: about 47 s of huggingface_hub retries for timm on a machine without network;
a request that hangs (a firewall that drops packets) had no bound at all."""

import os
import socket
import time
import types

import pytest
import torch

from transferkit import WeightsError, get_backbone
from transferkit.backbones import _hub


@pytest.fixture(autouse=True)
def _fresh_check(monkeypatch, tmp_path):
    """Each test decides the network itself; caches point at empty folders."""
    from huggingface_hub import constants

    _hub.forget()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    yield
    _hub.forget()


class _Network:
    """A stand-in for the socket module inside _hub: connections hang (or fail) and are counted."""

    def __init__(self, hang_s: float = 0.0, error: BaseException | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.hang_s, self.error = hang_s, error

    def create_connection(self, address, timeout=None):
        self.calls.append(address)
        if self.hang_s:
            time.sleep(self.hang_s)  # a resolver or a dropped SYN that never answers in time
        raise self.error or TimeoutError("timed out")


def _timed_error(fn) -> tuple[float, str]:
    t0 = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        fn()
    return time.perf_counter() - t0, str(info.value)


def test_hf_hub_offline_fails_at_once_without_touching_the_network(monkeypatch, tmp_path):
    net = _Network()
    monkeypatch.setattr(_hub, "socket", types.SimpleNamespace(create_connection=net.create_connection))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub was imported: still honoured
    took, msg = _timed_error(lambda: get_backbone("timm:resnet10t", weights="DEFAULT"))
    assert took < 2.0, f"took {took:.1f} s"
    assert "HF_HUB_OFFLINE is set" in msg and str(tmp_path / "hf" / "models--timm--resnet10t.c3_in1k") in msg
    assert "weights=None" in msg and "hf download timm/resnet10t.c3_in1k" in msg
    assert net.calls == []


def test_unreachable_hub_fails_within_two_seconds_and_is_checked_once(monkeypatch, tmp_path):
    from huggingface_hub import constants

    net = _Network(hang_s=30.0)  # a connection that would hang for 30 s
    monkeypatch.setattr(_hub, "socket", types.SimpleNamespace(create_connection=net.create_connection))
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example.invalid")
    took, msg = _timed_error(lambda: get_backbone("timm:resnet10t", weights="DEFAULT"))
    assert took < 2.0, f"took {took:.1f} s"
    assert "cannot reach hub.example.invalid:443: no answer within 1.5 s" in msg
    assert str(tmp_path / "hf" / "models--timm--resnet10t.c3_in1k") in msg and "weights=None" in msg
    took2, _ = _timed_error(lambda: get_backbone("timm:resnet18", weights="DEFAULT"))
    assert took2 < 0.5 and net.calls == [("hub.example.invalid", 443)]  # detected once per process

    # torchaudio's bundles live elsewhere (download.pytorch.org): one more check, as fast
    took3, msg3 = _timed_error(lambda: get_backbone("ta:wav2vec2_base"))
    assert took3 < 2.0, f"took {took3:.1f} s"
    assert "cannot reach download.pytorch.org:443" in msg3
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "wav2vec2_fairseq_base_ls960.pth") in msg3
    assert "weights=None" in msg3 and len(net.calls) == 2


def test_refused_connection_and_proxy(monkeypatch):
    net = _Network(error=ConnectionRefusedError(111, "Connection refused"))
    monkeypatch.setattr(_hub, "socket", types.SimpleNamespace(create_connection=net.create_connection))
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    reason = _hub.hub_unreachable("https://huggingface.co")
    assert reason == ("cannot reach the proxy proxy.example:3128 (for huggingface.co): "
                      "ConnectionRefusedError: [Errno 111] Connection refused")
    assert net.calls == [("proxy.example", 3128)]
    monkeypatch.setenv("TRANSFERKIT_HUB_TIMEOUT", "soon")
    _hub.forget()
    with pytest.raises(Exception, match="TRANSFERKIT_HUB_TIMEOUT must be a positive number"):
        _hub.hub_unreachable("https://huggingface.co")


def test_a_reachable_hub_is_remembered(monkeypatch):
    calls = []

    class _Conn:
        def close(self):
            pass

    def ok(address, timeout=None):
        calls.append(address)
        return _Conn()

    monkeypatch.setattr(_hub, "socket", types.SimpleNamespace(create_connection=ok))
    assert _hub.hub_unreachable("https://huggingface.co/timm/x") is None
    assert _hub.hub_unreachable("https://huggingface.co/timm/y") is None
    assert calls == [("huggingface.co", 443)]


def test_cached_weights_load_offline_without_retries(monkeypatch, tmp_path):
    """Offline with the file in the HF cache: the weights load, without the hub's retry loop."""
    import timm
    from safetensors.torch import save_file

    net = _Network(hang_s=0.5, error=socket.gaierror(-2, "Name or service not known"))
    monkeypatch.setattr(socket, "create_connection", net.create_connection)  # every client's, the hub's too
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example.invalid")  # huggingface_hub fails here too
    torch.manual_seed(0)
    src = timm.create_model("resnet10t", pretrained=False)
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--timm--resnet10t.c3_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha).mkdir(parents=True)
    save_file(src.state_dict(), str(repo / "snapshots" / sha / "model.safetensors"))
    t0 = time.perf_counter()
    bb = get_backbone("timm:resnet10t", weights="DEFAULT")
    assert time.perf_counter() - t0 < 10.0  # model build included; the hub's retries alone take ~45 s
    assert net.calls == [("hub.example.invalid", 443)]  # our one check; huggingface_hub never tried
    assert torch.equal(bb.trunk.layer4[0].conv2.weight, src.layer4[0].conv2.weight)
    assert constants.HF_HUB_OFFLINE is False  # offline mode was forced only during the load
    assert os.environ.get("HF_HUB_OFFLINE") is None
