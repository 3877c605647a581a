"""Weights requests fail fast when the hub cannot be reached.

Without the check: about 47 s of huggingface_hub retries for timm on a machine without network;
a request that hangs (a firewall that drops packets) had no bound at all. The tests assert the
behaviour, not the wall clock: one probe per host, cut off at the timeout while the connection
still hangs, and no other connection attempt (no retry loop)."""

import os
import socket
import threading
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
    """A stand-in for the socket module inside _hub: connections fail, or hang until the test
    ends (a resolver or a dropped SYN that never answers), and are counted."""

    def __init__(self, hang: bool = False, error: BaseException | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.ended: list[tuple[str, int]] = []  # connection attempts that came back (answered or failed)
        self.hang, self.error = hang, error
        self.release = threading.Event()

    def create_connection(self, address, timeout=None):
        self.calls.append(address)
        try:
            if self.hang:
                self.release.wait(300)
            raise self.error or TimeoutError("timed out")
        finally:
            self.ended.append(address)


@pytest.fixture
def no_other_connection(monkeypatch):
    """Every name lookup outside _hub's probe (huggingface_hub's, torch.hub's, a retry) is
    recorded and fails at once."""
    lookups: list[str] = []

    def lookup(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    return lookups


def _error(fn) -> str:
    with pytest.raises(WeightsError) as info:
        fn()
    return str(info.value)


def test_hf_hub_offline_fails_at_once_without_touching_the_network(monkeypatch, tmp_path, no_other_connection):
    net = _Network()
    monkeypatch.setattr(_hub, "socket", types.SimpleNamespace(create_connection=net.create_connection))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub was imported: still honoured
    msg = _error(lambda: get_backbone("timm:resnet10t", weights="DEFAULT"))
    assert no_other_connection == []
    assert "HF_HUB_OFFLINE is set" in msg and str(tmp_path / "hf" / "models--timm--resnet10t.c3_in1k") in msg
    assert "weights=None" in msg and "hf download timm/resnet10t.c3_in1k" in msg
    assert net.calls == []


def test_unreachable_hub_fails_at_the_timeout_and_is_checked_once(monkeypatch, tmp_path, no_other_connection):
    from huggingface_hub import constants

    net = _Network(hang=True)  # connections that hang until the test ends
    monkeypatch.setattr(_hub, "socket", types.SimpleNamespace(create_connection=net.create_connection))
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example.invalid")
    monkeypatch.setenv("TRANSFERKIT_HUB_TIMEOUT", "0.2")
    try:
        msg = _error(lambda: get_backbone("timm:resnet10t", weights="DEFAULT"))
        assert net.ended == []  # the error came while the probe still hung: it was cut off, not waited for
        assert "cannot reach hub.example.invalid:443: no answer within 0.2 s" in msg
        assert str(tmp_path / "hf" / "models--timm--resnet10t.c3_in1k") in msg and "weights=None" in msg
        _error(lambda: get_backbone("timm:resnet18", weights="DEFAULT"))
        assert net.calls == [("hub.example.invalid", 443)]  # detected once per process

        # torchaudio's bundles live elsewhere (download.pytorch.org): one more check, cut off the same way
        msg3 = _error(lambda: get_backbone("ta:wav2vec2_base"))
        assert "cannot reach download.pytorch.org:443: no answer within 0.2 s" in msg3
        assert str(tmp_path / "torch" / "hub" / "checkpoints" / "wav2vec2_fairseq_base_ls960.pth") in msg3
        assert "weights=None" in msg3 and len(net.calls) == 2 and net.ended == []
        # torchvision's files too: no "Downloading: ..." line from torch.hub before the error
        msg4 = _error(lambda: get_backbone("tv:squeezenet1_1", weights="DEFAULT"))
        assert "cannot reach download.pytorch.org:443: no answer within 0.2 s" in msg4
        assert str(tmp_path / "torch" / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth") in msg4
        assert len(net.calls) == 2  # the host's answer is remembered
        assert no_other_connection == []  # neither huggingface_hub nor torch.hub tried (no retries)
    finally:
        net.release.set()


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

    net = _Network(error=socket.gaierror(-2, "Name or service not known"))
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
    lookups: list[str] = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: lookups.append(host) or net.create_connection(
        (host, 0)))  # a client that resolves names itself (urllib3, httpx) is seen too
    bb = get_backbone("timm:resnet10t", weights="DEFAULT")
    assert net.calls == [("hub.example.invalid", 443)] and lookups == []  # our one check; the hub never tried
    assert torch.equal(bb.trunk.layer4[0].conv2.weight, src.layer4[0].conv2.weight)
    assert constants.HF_HUB_OFFLINE is False  # offline mode was forced only during the load
    assert os.environ.get("HF_HUB_OFFLINE") is None
