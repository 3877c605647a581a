"""Remote tar shards (pipe: commands, http URLs on a local server, fsspec URLs): the same
samples and results as the same shards on disk, one fetch per shard and node, a bounded
shard cache, indexes that make a second run fetch nothing, one-line errors."""

from __future__ import annotations

import gc
import io
import json
import os
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_image_folder
from shard_helpers import folder_files, gets, serve, uneven_sizes, write_shards

import transferkit as tk
from transferkit.data import eval_transform, prepare_data
from transferkit.data import remote
from transferkit.data.remote import ShardCache, parse_bytes
from transferkit.data.fingerprint import data_fingerprint
from transferkit.results import result_record
from transferkit.train.loaders import make_loader

SPEC = tk.InputSpec(image_size=16)
REPO = Path(__file__).resolve().parents[1]


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def _items(folder: Path):
    return [(f.read_bytes(), f.suffix[1:].lower(), c) for f, c in folder_files(folder)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 training shards of uneven sizes (one empty, one bad image) and 1 validation shard."""
    tmp = tmp_path_factory.mktemp("remote")
    items = _items(make_image_folder(tmp / "train", per_class=9, seed=0))
    items[3] = (b"not an image", "jpg", items[3][2])
    write_shards(items, tmp / "s", uneven_sizes(len(items), 4), prefix="train")
    write_shards(_items(make_image_folder(tmp / "val", per_class=3, seed=1)), tmp / "s", [6], prefix="val")
    return tmp / "s"


LOCAL = "train-{000000..000003}.tar"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_a_pipe_fetch_leaves_no_descriptor_open(tmp_path):
    """Each fetch's selector (an epoll descriptor) was left to garbage collection: a run that
    fetched thousands of shards could run out of descriptors."""
    import gc

    src = tmp_path / "s.tar"
    src.write_bytes(os.urandom(50_000))
    gc.disable()  # what is closed is closed by the fetch, not by a collection
    try:
        remote.stream_to(f"pipe:cat {src}", tmp_path / "warm.tar")
        before = len(os.listdir("/proc/self/fd"))
        for k in range(20):
            remote.stream_to(f"pipe:cat {src}", tmp_path / f"{k}.tar")
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        gc.enable()
    assert (tmp_path / "19.tar").read_bytes() == src.read_bytes()


def test_http_errors_leave_no_socket_to_the_collector(tmp_path):
    """Each 404 (a shard that is not there, an _info.json that is not) left its response's
    socket open until a garbage collection, with a ResourceWarning "unclosed <socket ...>"."""
    import gc

    (tmp_path / "x.tar").write_bytes(b"")
    with serve(tmp_path) as (base, _), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
        caught.clear()
        for url in (f"{base}/gone.tar", f"{base}/gone-too.tar"):
            with pytest.raises(remote.ShardFetchError, match="HTTP 404"):
                remote.stream_to(url, tmp_path / "out.tar")
            assert remote.fetch_small(f"{base}/_info.json") is None  # optional: none there
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


def test_http_pipe_and_fsspec_shards_give_the_local_samples(shards, tmp_path):
    local = _quiet(prepare_data, str(shards / LOCAL), val_split=0)
    with serve(shards) as (base, requests):
        by_http = _quiet(prepare_data, f"{base}/{LOCAL}", val_split=0)
        assert by_http.classes == local.classes == ["dark", "light"]  # from the served _info.json
        assert len(gets(requests)) == 4  # each shard fetched once to index it
    by_pipe = _quiet(prepare_data, f"pipe:cat {shards}/{LOCAL}", val_split=0)
    by_fsspec = _quiet(prepare_data, f"file://{shards}/{LOCAL}", val_split=0)
    for remote in (by_http, by_pipe, by_fsspec):
        assert remote.train.keys == local.train.keys and remote.train.targets == local.train.targets
        assert [remote.train.read_bytes(j) for j in range(len(local.train))] == \
               [local.train.read_bytes(j) for j in range(len(local.train))]
        assert [p.rsplit(":", 1)[1] for p, _ in remote.report.bad_files] == ["train0000003"]  # the bad image
        assert any("shards holds no sample" in w for w in remote.report.warnings)  # the empty shard


@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_finetune_on_remote_shards_matches_the_same_shards_on_disk(shards, tmp_path, kind):
    common = dict(weights=None, policy="finetune", epochs=2, batch_size=4, image_size=16, verbose=False,
                  num_workers=0, precision="fp32", augment="none", decode_once=False,
                  deterministic=True)  # two runs compared exactly: on a GPU too
    a = _quiet(tk.finetune, "tk:small_cnn", data=str(shards / LOCAL), val_data=str(shards / "val-000000.tar"),
               classes=["dark", "light"], **common)
    with serve(shards) as (base, requests):
        root = base if kind == "http" else f"pipe:cat {shards}"
        b = _quiet(tk.finetune, "tk:small_cnn", data=f"{root}/{LOCAL}", val_data=f"{root}/val-000000.tar",
                   classes=["dark", "light"], cache_dir=tmp_path / "cache", **common)
    assert [r["train_loss"] for r in b.history] == [r["train_loss"] for r in a.history]
    assert b.metrics["accuracy"] == a.metrics["accuracy"]
    assert len(list((tmp_path / "cache" / "shards").glob("*.tar"))) == 5  # 4 train + 1 val, kept
    if kind == "http":
        assert len(gets(requests)) == 5  # fetched once each, for the index; training read the cached copies


def test_second_run_with_cache_dir_fetches_no_shard_until_a_sample_is_read(shards, tmp_path):
    with serve(shards) as (base, requests):
        first = _quiet(prepare_data, f"{base}/{LOCAL}", val_split=0, cache_dir=tmp_path / "c")
        assert len(gets(requests)) == 4
        for p in (tmp_path / "c" / "shards").glob("*.tar"):
            p.unlink()  # only the indexes are left
        del requests[:]
        again = _quiet(prepare_data, f"{base}/{LOCAL}", val_split=0, cache_dir=tmp_path / "c")
        assert gets(requests) == []  # counts, labels, keys: all from the cached indexes
        assert [m for m, p in requests if p.endswith(".tar")] == ["HEAD"] * 4  # the validators, one per shard
        assert again.train.targets == first.train.targets and again.classes == first.classes
        assert data_fingerprint(again.train) == data_fingerprint(first.train)
        again.train.read_bytes(0)
        assert gets(requests) == ["/train-000000.tar"]  # the shard of the sample read, once
        again.train.read_bytes(1)
        assert len(gets(requests)) == 1
    log = tmp_path / "commands.log"
    cmd = f"pipe:echo run >> {log}; cat {shards}/{LOCAL}"
    _quiet(prepare_data, cmd, val_split=0, cache_dir=tmp_path / "p")
    assert log.read_text().count("run") == 4
    _quiet(prepare_data, cmd, val_split=0, cache_dir=tmp_path / "p")
    assert log.read_text().count("run") == 4  # a command's index is keyed by its text: no command run


def test_a_shard_changed_in_place_at_the_same_length_and_date_is_refused_when_fetched_again(shards, tmp_path):
    """A server without ETags (python -m http.server) gives the same length and date for a shard
    edited in place with its time restored: its labels were read from the stored index, after
    the shard was fetched again, without a word."""
    import shutil
    import tarfile

    served = tmp_path / "served" / "noetag"  # served as python -m http.server does: no ETag
    shutil.copytree(shards, served)
    with serve(served.parent) as (base, requests):
        url = f"{base}/noetag/train-000000.tar"
        first = _quiet(prepare_data, url, val_split=0, cache_dir=tmp_path / "c")
        first.train.read_bytes(0)
        first.train.source.close_shard(0)  # as a run that ended: its copy is no longer held
        shard = served / "train-000000.tar"
        before = shard.stat()
        with tarfile.open(shard) as tar:
            label = next(m for m in tar.getmembers() if m.name.endswith(".cls"))
        with open(shard, "r+b") as f:  # one label flipped, in place: the same length
            f.seek(label.offset_data)
            digit = f.read(1)
            f.seek(label.offset_data)
            f.write(b"1" if digit == b"0" else b"0")
        os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the same date
        for p in (tmp_path / "c" / "shards").glob("*.tar"):
            p.unlink()  # the copy goes (evicted, or another machine): the next read fetches it again
        again = _quiet(prepare_data, url, val_split=0, cache_dir=tmp_path / "c")
        with pytest.raises(tk.DataError, match=r"train-000000.tar' changed since it was indexed: the copy fetched "
                                               r"again holds other bytes, though the server gives the same length"):
            again.train.read_bytes(0)
        assert gets(requests)[-1] == "/noetag/train-000000.tar"


def test_a_remote_shard_is_hashed_as_it_is_fetched_not_read_again(shards, tmp_path, monkeypatch):
    """The digest that a copy fetched again is held to was taken by reading each downloaded
    copy once more (at indexing, and at each fetch again: with a shard cache smaller than the
    data, a second read of every shard each epoch). It is taken as the bytes are written."""
    import shutil

    import transferkit.data.shards as shards_module
    from transferkit._io import file_digest

    served = tmp_path / "served" / "noetag"
    shutil.copytree(shards, served)
    monkeypatch.setattr(shards_module, "file_digest", lambda path, **_: pytest.fail(f"{path} was read to hash it"))
    with serve(served.parent) as (base, requests):
        url = f"{base}/noetag/train-000000.tar"
        first = _quiet(prepare_data, url, val_split=0, cache_dir=tmp_path / "c")
        sample = first.train.read_bytes(0)
        first.train.source.close_shard(0)
        for p in (tmp_path / "c" / "shards").glob("*.tar"):
            p.unlink()
        again = _quiet(prepare_data, url, val_split=0, cache_dir=tmp_path / "c")
        assert again.train.read_bytes(0) == sample  # the same bytes, fetched again: accepted
        assert gets(requests).count("/noetag/train-000000.tar") == 2
    assert again.train.source.digests[0] == file_digest(served / "train-000000.tar")


def test_free_space_is_checked_before_a_fetch_of_known_size(shards, tmp_path, monkeypatch):
    import transferkit._io as io_

    monkeypatch.setattr(io_, "free_bytes", lambda path: 1000)
    with serve(shards) as (base, requests):
        with pytest.raises(tk.OutputError, match="Not enough free space for the shard cache copy"):
            prepare_data(f"{base}/train-000000.tar", val_split=0, cache_dir=tmp_path / "c")
        assert gets(requests) == []  # refused before the download


def test_a_changed_remote_shard_is_indexed_again(tmp_path):
    folder = make_image_folder(tmp_path / "img", per_class=3)
    write_shards(_items(folder), tmp_path / "s", [4, 2])
    with serve(tmp_path / "s") as (base, requests):
        url = f"{base}/train-{{000000..000001}}.tar"
        fp = data_fingerprint(_quiet(prepare_data, url, val_split=0, cache_dir=tmp_path / "c").train)
        time.sleep(1.1)  # Last-Modified has 1 s resolution
        write_shards(_items(folder)[::-1], tmp_path / "s", [3, 3])
        del requests[:]
        ds = _quiet(prepare_data, url, val_split=0, cache_dir=tmp_path / "c").train
        assert len(gets(requests)) == 2  # new validators: both indexed again
        assert data_fingerprint(ds) != fp
        assert ds.read_bytes(0) == _items(folder)[::-1][0][0]


def test_failed_fetches_are_one_line_errors(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "RETRY_WAITS", (0.0, 0.0))  # a failure that may pass: 3 attempts, no waiting here
    with serve(shards) as (base, requests):
        for bad, said in [(f"{base}/missing-{{0..1}}.tar", "missing-0.tar': HTTP 404 File not found."),
                          ("pipe:false", "'pipe:false': the command exited with code 1 (after 3 attempts over 0 s)."),
                          ("pipe:echo no such bucket >&2; exit 3", "exited with code 3: no such bucket (after 3 "),
                          (f"{base}/short/train-000000.tar", "connection ended early) (after 3 attempts"),
                          (f"file://{tmp_path}/nothing.tar", "does not exist.")]:
            with pytest.raises(tk.DataError, match="Cannot fetch the shard") as info:
                prepare_data(bad, val_split=0)
            assert said in str(info.value) and "\n" not in str(info.value), str(info.value)
        # a missing shard among a great many names stops the look-ups at once (all were queued: 3,489
        # requests, 37 s and 2.7 GB for a pattern of a million names before the 404 was said)
        import concurrent.futures

        queued, submit = [], concurrent.futures.ThreadPoolExecutor.submit
        monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit",
                            lambda pool, *a, **k: queued.append(1) or submit(pool, *a, **k))
        del requests[:]
        with pytest.raises(tk.DataError, match=r"train-000004.tar': HTTP 404"):
            prepare_data(f"{base}/train-{{000000..099999}}.tar", val_split=0)
        assert len(queued) <= 2 * 8 * 8 and len(requests) <= 2 * 8 * 8, (len(queued), len(requests))
        monkeypatch.undo()
        monkeypatch.setattr(remote, "RETRY_WAITS", (0.0, 0.0))
        del requests[:]
        flaky = _quiet(prepare_data, f"{base}/flaky/train-000000.tar", val_split=0)  # 503 twice, then the shard
        assert len(flaky.train) == len(_quiet(prepare_data, str(shards / "train-000000.tar"), val_split=0).train)
        assert gets(requests) == ["/flaky/train-000000.tar"] * 3
        with pytest.raises(tk.DataError, match="remote folder, which cannot be listed"):
            prepare_data(f"{base}/", val_split=0)
        # a signed URL: its query is no part of the file's name (it was refused as "no tar shard")
        signed = _quiet(prepare_data, f"{base}/train-000000.tar?token=a?b&c=[1]", val_split=0)
        assert len(signed.train) == len(flaky.train)
    with pytest.raises(tk.DataError, match="read only as tar shards"):
        prepare_data("https://example.com/data.parquet", val_split=0)
    with pytest.raises(tk.DataError, match=r"served under another name is read by a command: pipe:curl -s '<URL>'\."):
        prepare_data("https://example.com/get?id=7", val_split=0)
    # a full or read-only disk, or refused access, does not pass by waiting: one attempt
    import errno

    assert not remote._may_pass(OSError(errno.ENOSPC, "No space left on device"))
    assert not remote._may_pass(PermissionError("Access Denied")) and remote._may_pass(ConnectionResetError())


def test_a_signed_url_shows_no_signature_and_a_new_signature_is_the_same_shard(shards, tmp_path, capsys):
    """A signature is a credential: no error, warning or export shows it. It changes with each
    signing: a shard signed anew keeps its cached index and copy and the data's digest, and an
    interrupted run resumes with the new URLs."""
    from transferkit.errors import warn

    def signed(sig, *names):
        return [f"{base}/{n}?versionId=7&X-Amz-Credential=AKIA{sig}&X-Amz-Signature=SECRET{sig}" for n in names]

    def stop(row):
        raise KeyboardInterrupt

    two = ("train-000000.tar", "train-000001.tar")
    with serve(shards) as (base, requests):
        with pytest.raises(tk.DataError, match="HTTP 404") as info:
            prepare_data(signed(1, "missing-0.tar")[0], val_split=0)
        assert "SECRET" not in str(info.value) and "AKIA" not in str(info.value)
        assert "missing-0.tar?versionId=7&X-Amz-Credential=\u2026&X-Amz-Signature=\u2026" in str(info.value)
        with pytest.warns(tk.TransferkitWarning) as said:
            warn(f"left out {signed(1, 'a.tar')[0]} and https://ann:hunter2@host/b.tar")
        assert "SECRET" not in str(said[0].message) and "hunter2" not in str(said[0].message)
        from transferkit.cli import main

        assert main(["finetune", "--backbone", "tk:small_cnn", "--weights", "none", "--image-size", "16", "--json",
                     "--data", f"{base}/train-00000{{0..3}}.tar?sig=SECRET", "--dry-run"]) == 0
        out = capsys.readouterr()
        assert json.loads(out.out)["decisions"]["config"]["data"].endswith("train-00000{0..3}.tar?sig=\u2026")
        assert "SECRET" not in out.out + out.err
        common = dict(weights=None, policy="finetune", epochs=2, batch_size=4, image_size=16, verbose=False,
                      num_workers=0, precision="fp32", augment="none", decode_once=False, classes=["dark", "light"],
                      val_data=str(shards / "val-000000.tar"), cache_dir=tmp_path / "cache",
                      checkpoint=tmp_path / "run.ckpt", export=tmp_path / "m.pt")
        with pytest.raises(KeyboardInterrupt):
            _quiet(tk.finetune, "tk:small_cnn", data=signed(1, *two), callbacks=[stop], **common)
        before = _quiet(prepare_data, signed(1, *two), val_split=0, cache_dir=tmp_path / "cache")
        for p in (tmp_path / "cache" / "shards").glob("*.tar"):
            p.unlink()  # only the indexes are left
        del requests[:]
        again = _quiet(prepare_data, signed(2, *two), val_split=0, cache_dir=tmp_path / "cache")
        assert [m for m, p in requests if ".tar" in p] == ["HEAD", "HEAD"]  # the indexes: from the cache
        assert data_fingerprint(again.train) == data_fingerprint(before.train)
        again.train.read_bytes(0)
        assert len(gets(requests, suffix="SECRET2")) == 1
        del requests[:]
        resumed = _quiet(tk.finetune, "tk:small_cnn", data=signed(3, *two), resume=True,
                         **{**common, "portable_metadata": False})  # the export records the URLs, not signatures
        assert [m for m, p in requests if ".tar" in p] == ["HEAD", "HEAD"]  # the copy fetched at SECRET2 serves
        from transferkit.cli import main

        capsys.readouterr()
        assert main(["evaluate", str(tmp_path / "m.pt"), signed(4, "val-000000.tar")[0], "--json",
                     "--confusion-matrix", str(tmp_path / "cm.png")]) == 0
        out = capsys.readouterr()
        assert "X-Amz-Signature=\\u2026" in out.out and "SECRET" not in out.out + out.err
    assert len(resumed.history) == 2 and [r["epoch"] for r in resumed.history] == [1, 2]
    assert b"SECRET" not in (tmp_path / "m.pt").read_bytes() and b"AKIA" not in (tmp_path / "m.pt").read_bytes()
    assert b"train-000000.tar?versionId=7" in (tmp_path / "m.pt").read_bytes()
    record = json.dumps(result_record(resumed), default=str)  # what the command line prints
    assert "Left out 1 bad image" in record and "SECRET" not in record
    with pytest.raises(tk.DataError, match=r"my shard.tar\?sig=\u2026': InvalidURL") as info:  # a space in it
        prepare_data("https://127.0.0.1:9/my shard.tar?sig=SECRET", val_split=0)
    assert "SECRET" not in str(info.value)


def test_the_look_up_the_fetch_and_a_small_read_fail_alike_on_one_url(tmp_path, monkeypatch):
    """The three HTTP requests (a shard's look-up, its fetch, a small file beside it) said one
    failure three ways: the fetch tried a URL that cannot be requested again and again, and
    raised a bare ValueError for a malformed host."""
    monkeypatch.setattr(remote, "RETRY_WAITS", (0.01,))
    requests = {"look-up": remote.remote_validators, "fetch": lambda u: remote.stream_to(u, tmp_path / "copy"),
                "small file": remote.fetch_small}
    for url, said, attempts in (("http://127.0.0.1:9/x.tar?sig=S3CRET", "ConnectionRefusedError: [Errno 111] "
                                 "Connection refused (after 2 attempts over 0 s)", 2),
                                ("http://h/my shard.tar?sig=S3CRET", "InvalidURL: URL can't contain control", 1),
                                ("http://[::1/x.tar?sig=S3CRET", "ValueError: Invalid IPv6 URL.", 1)):
        for what, request in requests.items():
            with pytest.raises(remote.ShardFetchError) as info:
                request(url)
            message, shown = str(info.value), url.replace("S3CRET", "\u2026")
            assert message.startswith(f"Cannot fetch the shard {shown!r}: {said}"), (what, message)
            assert ("attempts" in message) == (attempts > 1), (what, message)
    import socket
    import threading

    server, connections = socket.socket(), []
    server.bind(("127.0.0.1", 0))
    server.listen()

    def garbage() -> None:  # a server (or a proxy) that answers something other than HTTP: tried again, as any
        while True:         # failure of the connection is, by all three requests
            try:
                conn, _ = server.accept()
            except OSError:
                return
            connections.append(1)
            conn.recv(65536)
            conn.sendall(b"garbage\r\n\r\n")
            conn.close()
    threading.Thread(target=garbage, daemon=True).start()
    try:
        for what, request in requests.items():
            del connections[:]
            with pytest.raises(remote.ShardFetchError, match=r": BadStatusLine: garbage \(after 2 attempts"):
                request(f"http://127.0.0.1:{server.getsockname()[1]}/x.tar")
            assert len(connections) == 2, what
    finally:
        server.close()


def test_a_shard_whose_server_refuses_head_is_known_by_its_first_byte(shards, tmp_path):
    """A URL signed for GET only is refused HEAD (403): a GET of its first byte gives its
    validators, so the URL signed anew keeps its cached index and copy. Where the server says
    nothing of the object, the signature stays part of its identity (an object replaced under
    a new signature is fetched, not taken for the old one); other parameters always do."""
    from transferkit.data.remote import shard_identity

    def url(sig):
        return f"{base}/gethonly/train-000000.tar?X-Amz-Signature={sig}"

    with serve(shards) as (base, requests):
        first = _quiet(prepare_data, url("A"), val_split=0, cache_dir=tmp_path / "c")
        assert [m for m, p in requests if ".tar" in p] == ["HEAD", "RANGE", "GET"]
        del requests[:]
        again = _quiet(prepare_data, url("B"), val_split=0, cache_dir=tmp_path / "c")
        again.train.read_bytes(0)
        assert [m for m, p in requests if ".tar" in p] == ["HEAD", "RANGE"]  # no fetch
        assert data_fingerprint(again.train) == data_fingerprint(first.train)
    assert shard_identity("https://h/a.tar?X-Amz-Signature=A", {}) == "https://h/a.tar?X-Amz-Signature=A"
    assert shard_identity("https://h/a.tar?v=1&X-Amz-Signature=A", {"etag": "1"}) == "https://h/a.tar?v=1"
    weak = {"content-length": "10240", "last-modified": "Mon, 07 Dec 2026 00:00:00 GMT"}  # rewritten with both kept:
    assert shard_identity("https://h/a.tar?X-Amz-Signature=A", weak) == "https://h/a.tar?X-Amz-Signature=A"  # apart
    for kept in ("https://h/get?key=train-000.tar&token=x", "https://h/a.tar?sp=train&sig=1"):  # no signing scheme
        assert shard_identity(kept, {"etag": "1"}) == kept


@pytest.mark.parametrize("text, shown", [
    ("https://h/a.tar?x-api-key=A&subscription-key=B&auth[token]=C&v=2", "https://h/a.tar?x-api-key=\u2026&"
     "subscription-key=\u2026&auth[token]=\u2026&v=2"),
    ("https://ann:p@ss@h/a.tar", "https://\u2026@h/a.tar"), ("https://TOKEN@h/a.tar", "https://\u2026@h/a.tar"),
    ("pipe:curl -s -H 'Authorization: Bearer SECRET' -u ann:SECRET https://h/a.tar",
     "pipe:curl -s -H 'Authorization: Bearer \u2026' -u \u2026 https://h/a.tar"),
    ("pipe:AWS_SECRET_ACCESS_KEY=SECRET aws s3 cp s3://b/a.tar -",
     "pipe:AWS_SECRET_ACCESS_KEY=\u2026 aws s3 cp s3://b/a.tar -"),
    ("Bad image 'https://h/a.tar?sig=SECRET:000123' (a damaged PNG).",
     "Bad image 'https://h/a.tar?sig=\u2026:000123' (a damaged PNG)."),
    # nothing but secrets changes: names, settings, other URLs
    ("/data/dl.php?id=3&key=7.jpg, class Q&A&key=1, lr=0.01&key=value", None),
    ("git+ssh://git@github.com/o/r, http://x/?, file:////server/a.tar, ?tokens_per_sample=128", None),
])
def test_secrets_are_hidden_and_nothing_else_changes(text, shown):
    from transferkit._text import hide_secrets

    assert hide_secrets(text) == (text if shown is None else shown)
    assert json.loads(hide_secrets(json.dumps(text))) == hide_secrets(text)  # JSON text stays that JSON


def test_a_password_in_an_http_shard_url_is_refused_without_showing_it():
    with pytest.raises(tk.DataError, match=r"'https://\u2026@h.invalid/a.tar': a user name or password in an HTTP"):
        prepare_data("https://ann:hunter2@h.invalid/a.tar", val_split=0)


def test_a_look_up_whose_server_is_down_for_a_moment_is_tried_again(shards, tmp_path, monkeypatch):
    """Only the GET was tried again: a HEAD refused while the server restarted ended the run at
    once, against "a server that restarts does not end a long job"."""
    import urllib.error
    import urllib.request

    monkeypatch.setattr(remote, "RETRY_WAITS", (0.0, 0.0))
    real, refused = urllib.request.urlopen, []

    def urlopen(request, *args, **kwargs):
        if getattr(request, "method", None) == "HEAD" and len(refused) < 2:
            refused.append(request.full_url)
            raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
        return real(request, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with serve(shards) as (base, requests):
        ds = _quiet(prepare_data, f"{base}/train-000000.tar", val_split=0, cache_dir=tmp_path / "c")
        assert len(refused) == 2 and [m for m, p in requests if p.endswith(".tar")].count("HEAD") == 1
    assert len(ds.train) == len(_quiet(prepare_data, str(shards / "train-000000.tar"), val_split=0).train)
    # a HEAD the server fails (5xx) leaves the identity to the URL and the GET; an _info.json it refuses (401:
    # a signed shard's folder) is no _info.json
    def refusing(request, *args, **kwargs):
        url = getattr(request, "full_url", request)
        if getattr(request, "method", None) == "HEAD" or url.endswith("_info.json"):
            raise urllib.error.HTTPError(url, 500 if url.endswith(".tar") else 401, "no", {}, None)
        return real(request, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", refusing)
    assert remote.remote_validators("http://127.0.0.1:9/x.tar") == {}
    assert remote.fetch_small("http://127.0.0.1:9/_info.json") is None


def test_a_fetch_that_stalls_fails_instead_of_waiting_forever(shards, tmp_path, monkeypatch):
    """A command silent for longer than the timeout, and a server that trickles a byte at a
    time (each read within its timeout, the whole never), fail as stalled fetches; the
    command is ended with what it started."""
    monkeypatch.setattr(remote, "RETRY_WAITS", (0.0,))
    monkeypatch.setenv("TRANSFERKIT_FETCH_TIMEOUT", "1")
    marker = tmp_path / "still-running"
    with serve(shards) as (base, _):
        # a shell that started another: both are ended (the inner one outlives a kill of the outer alone)
        for url in (f"pipe:sh -c 'sleep 3; touch {marker}'", f"{base}/trickle/train-000000.tar"):
            with pytest.raises(tk.DataError, match=r"the fetch stalled: \d+ bytes in the last 1 s \(fewer than 64 "
                                                   r"KiB; TRANSFERKIT_FETCH_TIMEOUT sets the seconds\) \(after 2 "
                                                   r"attempts"):
                prepare_data(url, val_split=0)
    time.sleep(3)
    assert not marker.exists()  # the stalled command was killed, not left to finish
    monkeypatch.setenv("TRANSFERKIT_FETCH_TIMEOUT", "soon")
    with pytest.raises(tk.ConfigError, match=r"TRANSFERKIT_FETCH_TIMEOUT must be a positive number of seconds, got "
                                             r"'soon'"):
        remote.fetch_timeout()


INTERRUPTED_FETCH = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job of a script ignores it)
from transferkit.data import prepare_data
print("start", flush=True)
try:
    prepare_data(sys.argv[1], val_split=0)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_ctrl_c_stops_the_fetches_of_the_shard_indexes_at_once(tmp_path):
    """Ctrl-C while the indexes' fetches ran in their threads was acted on only when every fetch
    had ended or stalled (minutes: 4 attempts of the fetch timeout), then said as a stalled fetch."""
    marker = tmp_path / "finished"
    script = tmp_path / "fetch.py"
    script.write_text(INTERRUPTED_FETCH)
    proc = subprocess.Popen([sys.executable, str(script), f"pipe:sh -c 'sleep 4; touch {marker}'"],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "TRANSFERKIT_FETCH_TIMEOUT": "120"})
    assert proc.stdout.readline().strip() == "start"
    time.sleep(2)  # the fetch has started
    proc.send_signal(2)
    out, _ = proc.communicate(timeout=60)
    assert out.strip() == "interrupted" and proc.returncode == 0
    time.sleep(3)
    assert not marker.exists()  # the command was ended with the fetch, not waited for


def test_ctrl_c_stops_an_http_fetch_that_waits_for_its_server(shards, tmp_path):
    """An HTTP fetch looked whether it was told to stop only between reads: Ctrl-C while the
    server sent nothing waited for the socket's timeout (the fetch timeout: 120 s here)."""
    script = tmp_path / "fetch.py"
    script.write_text(INTERRUPTED_FETCH)
    with serve(shards) as (base, requests):
        proc = subprocess.Popen([sys.executable, str(script), f"{base}/hang/{LOCAL}"], stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "TRANSFERKIT_FETCH_TIMEOUT": "120"})
        try:
            assert proc.stdout.readline().strip() == "start"
            while len(gets(requests)) < 4:  # every shard's GET waits for the server
                time.sleep(0.1)
            proc.send_signal(2)
            out, _ = proc.communicate(timeout=60)  # the server still sends nothing
        finally:
            proc.kill()
    assert out.strip() == "interrupted" and proc.returncode == 0


def test_an_interrupt_stops_only_the_fetches_it_waits_for(tmp_path):
    """The stop was one flag per process: an interrupt of one wait for fetches also stopped the
    fetches another thread of the process waited for."""
    from concurrent.futures import ThreadPoolExecutor

    slow = "pipe:sleep 3; echo done"
    with ThreadPoolExecutor(2) as pool, remote.stop_fetches_on_interrupt() as other:
        kept = pool.submit(other(remote.stream_to), slow, tmp_path / "kept")
        with pytest.raises(KeyboardInterrupt), remote.stop_fetches_on_interrupt() as stoppable:
            stopped = pool.submit(stoppable(remote.stream_to), slow, tmp_path / "stopped")
            time.sleep(1)  # both fetches run
            raise KeyboardInterrupt
        with pytest.raises(tk.DataError, match="the fetch was stopped: the run was interrupted"):
            stopped.result()
        kept.result()
    assert (tmp_path / "kept").read_text() == "done\n"
    with remote.stop_fetches_on_interrupt() as outer, remote.stop_fetches_on_interrupt() as inner:
        seen = outer(lambda: [inner(remote._stop_now)(), remote._stop_now()])()  # one inside the other
    assert seen[0] is not seen[1] and remote._NEVER not in seen and remote._stop_now() is remote._NEVER


def test_an_fsspec_fetch_that_stalls_fails_instead_of_waiting_forever(shards, monkeypatch):
    """A file system whose read waits for ever (no timeout of its own) is paced like HTTP:
    the fetch fails as stalled, and a file system that answers reads the shard."""
    import threading

    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    release = threading.Event()

    class Stuck(LocalFileSystem):
        protocol = "stuck"

        def _open(self, path, mode="rb", **kwargs):
            f = super()._open(path.replace("stuck://", ""), mode, **kwargs)
            if path.endswith(".tar") and not release.is_set():  # 10 bytes, then nothing until released
                real = f.read
                f.read = lambda n=-1: (release.wait(), real(n))[1] if f.tell() else real(10)
            return f

    fsspec.register_implementation("stuck", Stuck, clobber=True)
    monkeypatch.setattr(remote, "RETRY_WAITS", (0.0,))
    monkeypatch.setenv("TRANSFERKIT_FETCH_TIMEOUT", "1")
    try:
        with pytest.raises(tk.DataError, match=r"the fetch stalled: 10 bytes in the last 1 s \(fewer than 64 KiB; "
                                               r"TRANSFERKIT_FETCH_TIMEOUT sets the seconds\) \(after 2 attempts"):
            prepare_data(f"stuck://{shards}/{LOCAL}", val_split=0)
        release.set()  # the stalled threads end; now every read answers
        assert len(_quiet(prepare_data, f"stuck://{shards}/{LOCAL}", val_split=0).train) == \
            len(_quiet(prepare_data, str(shards / LOCAL), val_split=0).train)
    finally:
        release.set()


def test_an_http_fetch_is_a_stall_only_while_more_is_to_come(monkeypatch):
    """A body whose bytes all came late (slow headers, then a small shard at once) is whole:
    the read that finds its end does not wait; a window of too few bytes with more to come
    is a stall. The clock is the test's."""
    from types import SimpleNamespace

    now = [0.0]
    monkeypatch.setattr(remote, "time", SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setenv("TRANSFERKIT_FETCH_TIMEOUT", "1")

    class Response:  # http.client's: read1 gives what has come; length counts down what is announced
        def __init__(self, chunks, seconds, length):
            self.chunks, self.seconds, self.length = chunks, seconds, length

        def read1(self, n):
            if not self.chunks:
                return b""
            now[0] += self.seconds
            chunk = self.chunks.pop(0)
            self.length = None if self.length is None else self.length - len(chunk)
            return chunk

    def fetch(response):
        out, pace = io.BytesIO(), remote._Pace("http://h/s.tar")
        remote._copy_paced(remote._http_reader(response, pace), out, pace)
        return out.getvalue()

    assert fetch(Response([b"x" * 30_000], 2.0, 30_000)) == b"x" * 30_000
    now[0] = 0.0
    with pytest.raises(remote.ShardFetchError, match=r"the fetch stalled: 2 bytes in the last 1 s"):
        fetch(Response([b"x"] * 5, 0.6, None))


def test_a_truncated_remote_shard_is_a_bad_shard_and_is_not_cached(shards, tmp_path):
    cmd = f"pipe:head -c 3000 {shards}/train-000000.tar"
    with pytest.raises(tk.DataError, match=r"Cannot read the shard 'pipe:head .*truncated"):
        prepare_data(cmd, val_split=0, on_bad_file="raise", cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c" / "shards").glob("*.tar"))
    b = _quiet(prepare_data, [cmd, f"pipe:cat {shards}/{LOCAL}"], val_split=0)
    assert b.report.bad_files[0][0] == cmd and "truncated" in b.report.bad_files[0][1]
    assert len(b.train) == len(_quiet(prepare_data, str(shards / LOCAL), val_split=0).train)


def test_fsspec_missing_names_the_packages_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(tk.DataError, match="pip install fsspec s3fs"):
        prepare_data("s3://bucket/train-{0..1}.tar", val_split=0)


FETCH = """
import sys
from transferkit.data.remote import ShardCache
held = ShardCache(sys.argv[1]).fetch(sys.argv[2])
print(held.path.stat().st_size)
"""


def test_two_processes_fetching_one_shard_download_it_once(shards, tmp_path):
    with serve(shards) as (base, requests):
        url = f"{base}/slow/train-000000.tar"  # the server waits 0.5 s: the second process comes mid-fetch
        procs = [subprocess.Popen([sys.executable, "-c", FETCH, str(tmp_path / "cache"), url], cwd=REPO,
                                  stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
                 for _ in range(2)]
        sizes = [p.communicate(timeout=120)[0].strip() for p in procs]
        assert [p.returncode for p in procs] == [0, 0]
        assert gets(requests) == ["/slow/train-000000.tar"]  # one download
    assert sizes == [str((shards / "train-000000.tar").stat().st_size)] * 2
    assert len(list((tmp_path / "cache").glob("*.tar"))) == 1
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tk-" in p.name]  # no temporary left


def test_the_shard_cache_keeps_its_budget_and_never_evicts_a_shard_in_use(shards, tmp_path):
    size = [(shards / f"train-{k:06d}.tar").stat().st_size for k in range(4)]
    assert size[0] > size[2] > 0 and size[3] > 0
    cache = ShardCache(tmp_path / "c", budget=size[0] + 100)
    urls = [f"file://{shards}/train-{k:06d}.tar" for k in range(4)]
    cache.fetch(urls[0]).release()
    held = cache.fetch(urls[2])  # over the budget with shard 0: shard 0 (not in use) goes
    assert not cache.path(urls[0]).exists() and cache.path(urls[2]).exists()
    again = cache.fetch(urls[0])  # over the budget with shard 2, which is in use: kept
    assert cache.path(urls[2]).exists() and cache.path(urls[0]).exists()
    assert held.path.read_bytes() == (shards / "train-000002.tar").read_bytes()
    held.release()  # over the budget once shard 2 is no longer in use: it goes (it stayed, the cache over budget)
    assert not cache.path(urls[2]).exists() and cache.path(urls[0]).exists()
    assert not cache.over  # within the budget again: a release looks at the copies no more (ms each)
    looks, make_room = [], cache.make_room
    cache.make_room = lambda need, keep=None: looks.append(need) or make_room(need, keep=keep)
    again.release()  # within the budget: kept
    assert looks == []
    del cache.make_room
    assert cache.path(urls[0]).exists()
    cache.fetch(urls[3]).release()  # the least recently used go first until it fits
    assert [cache.path(u).exists() for u in urls] == [False, False, False, True]
    assert parse_bytes("20G") == 20 * 2**30 and parse_bytes("1500") == 1500


def test_a_process_waiting_for_a_fetch_does_not_wait_for_the_readers_of_the_copy(tmp_path):
    """Two processes want a shard that is not cached: one fetches it and then reads it,
    holding the shared lock while it reads (an idle DataLoader worker keeps its shards open).
    The other, which asked for the exclusive lock before the copy was there, used to wait for
    that reader for good: a hang of the DataLoader."""
    import fcntl
    import threading

    from transferkit.data.remote import ShardCache

    cache = ShardCache(tmp_path / "cache")
    url = "http://127.0.0.1:9/train-000000.tar"  # never fetched: the copy comes from the other process
    target = cache.path(url)
    cache.folder.mkdir(parents=True)
    target.with_suffix(".lock").touch()
    reader = os.open(target.with_suffix(".lock"), os.O_RDWR)  # an open file of its own locks as another process
    fcntl.flock(reader, fcntl.LOCK_SH)  # does: one reading the copy it has just fetched

    def fetched():
        time.sleep(0.3)
        target.write_bytes(b"shard")
    threading.Thread(target=fetched, daemon=True).start()
    got = []
    waiter = threading.Thread(target=lambda: got.append(cache.fetch(url)), daemon=True)
    waiter.start()
    waiter.join(timeout=20)
    assert got and got[0].path == target  # it did not wait for the reader to close the copy
    got[0].release()
    os.close(reader)


def test_a_shard_cache_smaller_than_the_shards_reads_shard_by_shard(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "img", per_class=20)
    write_shards(_items(folder), tmp_path / "s", [10, 0, 7, 13, 10])
    monkeypatch.setenv("TRANSFERKIT_SHARD_CACHE", "1")  # holds no shard beyond those in use
    with serve(tmp_path / "s") as (base, requests):
        b = prepare_data(f"{base}/train-{{000000..000004}}.tar", val_split=0)
        assert any("they are read shard by shard, each fetched about once a pass" in w for w in b.report.warnings)
        ds = b.train.view(transform=eval_transform(SPEC))
        for workers in (0, 2):
            del requests[:]
            labels = []
            for rank in range(2):
                dl = make_loader(ds, batch_size=4, shuffle=True, device=torch.device("cpu"), num_workers=workers,
                                 seed=3, rank=rank, world_size=2)
                dl.sampler.set_epoch(1)
                labels += [int(t) for _, y in dl for t in y]
            assert sorted(labels) == sorted(b.train.targets)  # every sample once (40 over 2 ranks: no padding)
            fetched = Counter(gets(requests))
            # 4 non-empty shards: each fetched about once (a shard at a rank's slice boundary twice; with workers,
            # one prefetching far ahead may drop a shard another still needs); a global shuffle: one per sample
            assert sum(fetched.values()) <= (4 + 1 if workers == 0 else 8), fetched
        from transferkit.decisions import differences
        from transferkit.train.resume import resume_refused

        run = dict(weights=None, data=f"{base}/train-{{000000..000004}}.tar", val_split=0, image_size=16, epochs=2,
                   policy="full", verbose=False)
        by_shard = _quiet(tk.plan, "tk:small_cnn", **run, decode_once=False)
        said = "The training samples are drawn shard by shard"  # where the run draws them so, and only there
        assert by_shard.sample_order == "shard by shard" and any(n.startswith(said) for n in by_shard.notes)
        decoded_once = _quiet(tk.plan, "tk:small_cnn", **run)  # decoded once: shuffled whole
        assert decoded_once.sample_order == "shuffled" and not any(said in n for n in decoded_once.notes)
        monkeypatch.setenv("TRANSFERKIT_SHARD_CACHE", "16G")
        whole = prepare_data(f"{base}/train-{{000000..000004}}.tar", val_split=0)
        assert whole.train.sample_groups() is None  # the cache holds them: a global shuffle
        # a resume under another shard cache drew another order, without a word: it is refused, saying why
        shuffled = _quiet(tk.plan, "tk:small_cnn", **run, decode_once=False)
        diff = differences(by_shard.to_dict(), shuffled.to_dict())
        assert diff == {"sample_order": ("shard by shard", "shuffled")}
        assert "the checkpoint's run drew them shard by shard, this one has TRANSFERKIT_SHARD_CACHE=16G: resume with " \
            "the checkpoint's shard cache (a smaller TRANSFERKIT_SHARD_CACHE)" in str(resume_refused("run.ckpt", diff))
        decoded = differences(by_shard.to_dict(), _quiet(tk.plan, "tk:small_cnn", **run).to_dict())  # decode_once
        assert "sample_order" in decoded and "its decode_once or feature cache differs (above): resume with the " \
            "checkpoint's settings." in str(resume_refused("run.ckpt", decoded))


def test_feature_store_from_remote_shards_fetches_each_shard_once_and_equals_the_local_one(shards, tmp_path,
                                                                                          monkeypatch):
    common = dict(weights=None, policy="feature_extraction", epochs=2, batch_size=4, image_size=16, verbose=False,
                  num_workers=0, precision="fp32", augment="none", classes=["dark", "light"])
    a = _quiet(tk.finetune, "tk:small_cnn", data=str(shards / LOCAL), val_data=str(shards / "val-000000.tar"),
               cache_dir=tmp_path / "local", **common)
    monkeypatch.setenv("TRANSFERKIT_SHARD_CACHE", "1")  # keeps no shard beyond those in use
    with serve(shards) as (base, requests):
        b = _quiet(tk.finetune, "tk:small_cnn", data=f"{base}/{LOCAL}", val_data=f"{base}/val-000000.tar",
                   cache_dir=tmp_path / "remote", **common)
    assert b.feature_report["samples"] == a.feature_report["samples"]
    assert [r["train_loss"] for r in b.history] == [r["train_loss"] for r in a.history]
    assert b.metrics["accuracy"] == a.metrics["accuracy"]
    fetched = Counter(gets(requests))
    assert len(fetched) == 5 and max(fetched.values()) <= 2, fetched  # once to index, at most once to extract
    stores = [sorted(p.read_bytes() for p in root.rglob("features.npy")) for root in (tmp_path / "local",
                                                                                      tmp_path / "remote")]
    assert stores[0] and stores[0] == stores[1]  # the same features, bit for bit


def test_a_shard_that_cannot_be_fetched_during_training_stops_it_instead_of_replacing_samples(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "img", per_class=4)
    write_shards(_items(folder), tmp_path / "s", [4, 4])
    with serve(tmp_path / "s") as (base, requests):
        b = _quiet(prepare_data, f"{base}/train-{{000000..000001}}.tar", val_split=0)
        for k in range(2):
            (tmp_path / "s" / f"train-{k:06d}.tar").rename(tmp_path / "s" / f"gone-{k}.tar")
        for copy in b.train.source.shard_cache.folder.glob("*.tar"):
            copy.unlink()  # the last shard fetched for the index may still be there
        del requests[:]
        ds = b.train.view(transform=eval_transform(SPEC))
        with pytest.raises(tk.DataError, match=r"Cannot fetch the shard .*train-00000[01].tar': HTTP 404"):
            ds[0]
        assert b.report.bad_at_load == []  # not taken for bad samples
        assert len(gets(requests)) == 1  # no sample after sample of the same shard


def test_the_engines_check_items_of_the_first_remote_shard_only(shards, tmp_path):
    """The engines' check batch spread its items over the whole data: on remote shards that
    fetched nearly every shard, one after another, before the feature pass started."""
    from transferkit.train.engines import example_indices

    data = _quiet(prepare_data, f"pipe:cat {shards}/{LOCAL}", val_split=0, cache_dir=tmp_path / "c").train
    groups = data.fetch_groups()
    assert groups is not None and len(set(groups.tolist())) > 2
    picked = example_indices(data, batch_size=4)
    assert len(picked) > 4 and {int(groups[i]) for i in picked} == {int(groups[0])}
    local = _quiet(prepare_data, str(shards / LOCAL), val_split=0).train
    assert local.fetch_groups() is None  # local shards are read in place: the items spread over all of them
    assert len({int(g) for g in np.asarray(local.source.shard_of)[example_indices(local, batch_size=4)]}) > 1


def test_a_run_with_the_servers_down_trains_from_cache_dir_when_told_it_is_offline(shards, tmp_path, monkeypatch):
    """A run whose shards had all been fetched into cache_dir failed once their server was down:
    TRANSFERKIT_OFFLINE=1 reads them (indexes, copies, _info.json) as the last online run found
    them, asks nothing of the server, and says what is missing where the cache lacks it."""
    from transferkit.data.remote import ShardFetchError

    monkeypatch.setattr(remote, "RETRY_WAITS", (0.0,))
    cache = tmp_path / "c"
    with serve(shards) as (base, _):
        online = _quiet(prepare_data, f"{base}/{LOCAL}", val_split=0, cache_dir=cache)
        for i in range(len(online.train)):
            online.train.read_bytes(i)  # every shard fetched into the cache
    with pytest.raises(ShardFetchError, match=r"Connection refused.*holds its index and copy as an earlier run found "
                                              r"them: with TRANSFERKIT_OFFLINE=1 a run reads the cache without the"):
        _quiet(prepare_data, f"{base}/{LOCAL}", val_split=0, cache_dir=cache)
    with pytest.raises(ShardFetchError) as no_hint:  # another scan has no index there: an offline run would fail
        _quiet(prepare_data, f"{base}/{LOCAL}", val_split=0, cache_dir=cache, scan="full")
    assert "Connection refused" in str(no_hint.value) and "TRANSFERKIT_OFFLINE" not in str(no_hint.value)
    signed = [remote._seen_path(cache, f"{base}/x.tar?X-Amz-Signature={s}&X-Amz-Expires=60") for s in ("a", "b")]
    assert signed[0] == signed[1] == remote._seen_path(cache, f"{base}/x.tar")  # signed again: the same record
    monkeypatch.setenv("TRANSFERKIT_OFFLINE", "1")
    offline = _quiet(prepare_data, f"{base}/{LOCAL}", val_split=0, cache_dir=cache)
    assert offline.classes == online.classes == ["dark", "light"]  # the _info.json as the online run read it
    assert offline.train.targets == online.train.targets
    assert data_fingerprint(offline.train) == data_fingerprint(online.train)  # feature stores are found again
    assert [offline.train.read_bytes(i) for i in range(len(offline.train))] == \
        [online.train.read_bytes(i) for i in range(len(online.train))]
    result = _quiet(tk.finetune, "tk:small_cnn", weights=None, data=f"{base}/{LOCAL}", val_split=0.25,
                    cache_dir=cache, image_size=16, epochs=1, batch_size=8, num_workers=0, device="cpu", verbose=False)
    assert len(result.history) == 1
    with pytest.raises(ShardFetchError, match=r"TRANSFERKIT_OFFLINE=1, and cache_dir .* holds no record of "
                                              r"'http://127.0.0.1:\d+/train-000000.tar' \(no run with this cache_dir"):
        _quiet(prepare_data, f"{base}/{LOCAL}", val_split=0, cache_dir=tmp_path / "other")
    with pytest.raises(ShardFetchError, match="reads remote shards from cache_dir alone, and this run has none"):
        _quiet(prepare_data, f"{base}/{LOCAL}", val_split=0)
    del online, offline, result  # their open copies released (the cache removes none in use)
    gc.collect()
    for copy in (cache / "shards").glob("*.tar"):
        copy.unlink()  # removed to keep the cache's budget: the indexes are there, the copies not
    again = _quiet(prepare_data, f"{base}/{LOCAL}", val_split=0, cache_dir=cache)
    with pytest.raises(ShardFetchError, match=r"TRANSFERKIT_OFFLINE=1, and the shard cache .* holds no copy of "
                                              r"'http://127.0.0.1:\d+/train-00000\d.tar' as it was indexed"):
        again.train.read_bytes(0)
    monkeypatch.setenv("TRANSFERKIT_OFFLINE", "maybe")
    with pytest.raises(tk.ConfigError, match=r"TRANSFERKIT_OFFLINE='maybe' is neither on nor off"):
        _quiet(prepare_data, f"{base}/{LOCAL}", val_split=0, cache_dir=cache)


def test_a_shard_error_in_a_loader_worker_reaches_the_user_as_its_one_line():
    """torch raises a worker's error again in the main process with the worker's whole traceback
    as its message: an offline run missing a shard's copy printed some thirty lines (and the
    command line rewrote the quoted source lines as flags)."""
    from torch.utils.data import DataLoader, Dataset

    from transferkit.data.remote import ShardFetchError

    class Missing(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise ShardFetchError("TRANSFERKIT_OFFLINE=1, and the shard cache holds no copy of 'x.tar'.")

    with pytest.raises(ShardFetchError) as info:
        next(iter(DataLoader(Missing(), num_workers=1)))
    assert str(info.value) == "TRANSFERKIT_OFFLINE=1, and the shard cache holds no copy of 'x.tar'."
