"""Knowing at once when a weights hub cannot be reached.

Without this, an offline request for timm weights spends about 48 s in huggingface_hub's
retries before it fails. `hub_unreachable` opens one TCP connection to the hub's host
(or to the HTTPS proxy that would carry the request) with a short timeout, once per host
and process, and says why it failed; the backbone sources then raise their actionable
[`WeightsError`][transferkit.WeightsError] at once, unless the file is already in the local cache.

``HF_HUB_OFFLINE=1`` (read at call time, so setting it after import works too) means "do not
touch the network" for the Hugging Face hub: no check, cache only.
``TRANSFERKIT_HUB_TIMEOUT`` sets the connection timeout in seconds (default 1.5).

Example:
    >>> hub_unreachable("https://huggingface.co")  # doctest: +SKIP
    'cannot reach huggingface.co:443: gaierror: [Errno -2] Name or service not known'
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator

from transferkit.config import env_seconds

DEFAULT_TIMEOUT_S = 1.5
_results: dict[tuple[str, int], str | None] = {}
_lock = threading.Lock()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hf_offline_requested() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, in the environment now or in
    huggingface_hub's constants at its import."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or _truthy(os.environ.get("HF_HUB_OFFLINE")) \
        or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


@contextlib.contextmanager
def hf_offline(enabled: bool = True) -> Iterator[None]:
    """huggingface_hub in offline mode inside the block (cache only, no retries), restored after."""
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def timeout_s() -> float:
    """The connection timeout: ``TRANSFERKIT_HUB_TIMEOUT`` seconds, else 1.5."""
    return env_seconds("TRANSFERKIT_HUB_TIMEOUT", DEFAULT_TIMEOUT_S)


def _address(url: str) -> tuple[str, int, str]:
    """The host and port a request for ``url`` connects to first (its proxy, if one applies),
    and how to name it in a message."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        if p.hostname:
            pport = p.port or (443 if p.scheme == "https" else 80)
            return p.hostname, pport, f"the proxy {p.hostname}:{pport} (for {host})"
    return host, port, f"{host}:{port}"


def _connect(host: str, port: int, timeout: float, out: list[BaseException | None]) -> None:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        out.append(None)
    except BaseException as exc:  # noqa: BLE001  any failure means "cannot reach"; the caller words it
        out.append(exc)


def hub_unreachable(url: str) -> str | None:
    """``None`` when a TCP connection to ``url``'s host (or its proxy) opens within the timeout,
    else a short reason such as ``"cannot reach huggingface.co:443: gaierror: ..."``.

    Checked once per host and port in a process: later calls return the first answer at once.
    Name resolution runs in a helper thread, so a resolver that hangs is cut off at the timeout too.

    Example:
        >>> hub_unreachable("https://download.pytorch.org/models/x.pth")  # doctest: +SKIP
    """
    host, port, label = _address(url)
    if not host:
        return f"{url!r} names no host"
    with _lock:
        if (host, port) in _results:
            return _results[(host, port)]
        limit = timeout_s()
        out: list[BaseException | None] = []
        worker = threading.Thread(target=_connect, args=(host, port, limit, out), daemon=True,
                                  name="transferkit-hub-check")
        worker.start()
        worker.join(limit)
        if not out:
            reason: str | None = f"cannot reach {label}: no answer within {limit:g} s"
        elif out[0] is None:
            reason = None
        else:
            reason = f"cannot reach {label}: {type(out[0]).__name__}: {out[0]}"
        _results[(host, port)] = reason
        return reason


def forget() -> None:
    """Drop the remembered answers (the next `hub_unreachable` checks again)."""
    with _lock:
        _results.clear()
