"""Writing WebDataset-format tar shards (and Parquet files) from image folders, and serving
them over HTTP on 127.0.0.1, for tests."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import re
import json
import tarfile
import threading
import time
from pathlib import Path

import numpy as np


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def folder_files(folder: Path) -> list[tuple[Path, str]]:
    """``(file, class)`` of ``folder/<class>/<file>``, sorted."""
    return [(f, c.name) for c in sorted(p for p in Path(folder).iterdir() if p.is_dir())
            for f in sorted(c.iterdir()) if f.is_file()]


def write_shards(items: list[tuple[bytes, str, str]], out: Path, sizes: list[int], *, prefix: str = "train",
                 classes: list[str] | None = None, label: str = "cls", info: bool = True) -> list[Path]:
    """Write ``items`` of ``(image bytes, extension, class name)`` into ``len(sizes)`` shards of
    ``sizes[k]`` samples (0: an empty shard), named ``<prefix>-000000.tar``...; the label as
    ``cls`` (the class index), ``txt`` (the name) or ``json`` ({"label": name}). With ``info``
    an ``_info.json`` beside them lists the classes."""
    assert sum(sizes) == len(items), (sum(sizes), len(items))
    out.mkdir(parents=True, exist_ok=True)
    classes = classes or sorted({c for _, _, c in items})
    paths, k = [], 0
    for s, size in enumerate(sizes):
        path = out / f"{prefix}-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(size):
                data, ext, cls = items[k]
                key = f"{prefix}{k:07d}"
                _add(tar, f"{key}.{ext}", data)
                if label == "cls":
                    _add(tar, f"{key}.cls", str(classes.index(cls)).encode())
                elif label == "txt":
                    _add(tar, f"{key}.txt", cls.encode())
                else:
                    _add(tar, f"{key}.json", json.dumps({"label": cls}).encode())
                k += 1
        paths.append(path)
    if info:
        (out / "_info.json").write_text(json.dumps({"classes": classes}))
    return paths


def folder_items(folder: Path, seed: int = 0) -> list[tuple[bytes, str, str]]:
    """The images of an image folder as ``(bytes, extension, class)``, in a seeded order."""
    files = folder_files(folder)
    order = np.random.default_rng(seed).permutation(len(files))
    return [(files[i][0].read_bytes(), files[i][0].suffix[1:].lower(), files[i][1]) for i in order]


def uneven_sizes(n: int, shards: int, seed: int = 0, empty: bool = True) -> list[int]:
    """``shards`` sizes adding up to ``n``, uneven, the second one 0 when ``empty``."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.3, 1.7, shards)
    if empty and shards > 1:
        w[1] = 0
    sizes = np.floor(w / w.sum() * n).astype(int)
    sizes[0] += n - sizes.sum()
    return sizes.tolist()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; records each request; ``/slow/...`` waits before answering,
    ``/short/...`` announces the whole file but sends half of it, ``/flaky/...`` answers
    HTTP 503 to the first two GETs of each tar file, ``/trickle/...`` sends a byte every
    0.05 s, ``/hang/...`` answers a GET only once the server's ``release`` event is set, and
    ``/gethonly/...`` refuses HEAD (403, as for a URL signed for GET) and answers a GET of a
    byte range (recorded as ``RANGE``) with that range."""

    def log_message(self, *args):  # quiet
        pass

    def end_headers(self):  # an ETag, as object stores send (a digest of the file's bytes); none under noetag/
        f = Path(self.translate_path(self.path))
        if f.is_file() and f.suffix == ".tar" and "noetag" not in f.parts:
            self.send_header("ETag", '"' + hashlib.md5(f.read_bytes()).hexdigest() + '"')
        super().end_headers()

    def _record(self):
        self.server.requests.append(("RANGE" if self.headers.get("Range") else self.command, self.path))

    def do_HEAD(self):
        self._record()
        if self.path.startswith("/gethonly/"):
            self.send_error(403, "Forbidden")
            return
        for kind in ("/slow/", "/short/", "/flaky/", "/trickle/", "/hang/"):
            self.path = self.path.replace(kind, "/", 1)
        super().do_HEAD()

    def do_GET(self):
        self._record()
        if self.path.startswith("/gethonly/"):
            self.path = self.path.replace("/gethonly/", "/", 1)
            byte = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range") or "")
            if byte:
                f = Path(self.translate_path(self.path))
                data = f.read_bytes()
                start, end = int(byte.group(1)), min(int(byte.group(2)), len(data) - 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Last-Modified", self.date_time_string(f.stat().st_mtime))
                self.end_headers()
                self.wfile.write(data[start:end + 1])
                return
        if self.path.startswith("/flaky/"):
            if self.path.endswith(".tar") and sum(1 for m, p in self.server.requests
                                                  if m == "GET" and p == self.path) <= 2:
                self.send_error(503, "Service Unavailable")
                return
            self.path = self.path.replace("/flaky/", "/", 1)
        if self.path.startswith("/hang/"):
            self.server.release.wait()
            self.path = self.path.replace("/hang/", "/", 1)
        if self.path.startswith("/slow/"):
            time.sleep(0.5)
            self.path = self.path.replace("/slow/", "/", 1)
        if self.path.startswith("/trickle/"):
            data = (Path(self.directory) / self.path[len("/trickle/"):]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for i in range(len(data)):
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:  # the client gave up
                pass
            self.close_connection = True
            return
        if self.path.startswith("/short/"):
            data = (Path(self.directory) / self.path[len("/short/"):]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()


@contextlib.contextmanager
def serve(folder: Path):
    """An HTTP server on 127.0.0.1 (a free port) serving ``folder``: ``(base URL, requests)``."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
    srv.requests, srv.release = [], threading.Event()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}", srv.requests
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()


def gets(requests, suffix=".tar"):
    return [p for m, p in requests if m == "GET" and p.endswith(suffix)]
