"""A process killed while it saves never leaves a broken checkpoint or export behind."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import transferkit._io as io_
from transferkit._io import atomic_write
from transferkit.errors import ExportError, WeightsError
from transferkit.checkpoints import load_checkpoint, save_checkpoint

WRITER = textwrap.dedent("""
    import sys, torch
    from transferkit.checkpoints import save_checkpoint
    path, i = sys.argv[1], 0
    model = torch.nn.Linear(512, 512)          # about 1 MB a checkpoint
    print("ready", flush=True)
    while True:                                # rewrite the same file until killed
        i += 1
        with torch.no_grad():
            model.weight.fill_(float(i))
        save_checkpoint(path, model=model, meta={"i": i})
""")


def test_killed_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    seen = []
    for delay in (0.07, 0.31, 0.66):  # kill at several moments of the write loop
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if path.exists():  # the first kill may come before any save finished
            ckpt = load_checkpoint(path)
            value = ckpt["model"]["weight"][0, 0].item()
            assert ckpt["transferkit"]["i"] == value  # the file is one whole save, never a mix
            seen.append(value)
    assert seen, "no save completed in any run"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt.pt.") and p.name.endswith(".tmp")]
    assert len(leftovers) <= 1  # each writer's first save removed the temporaries of the one killed before it
    save_checkpoint(path, model=torch.nn.Linear(2, 2), meta={"i": -1})  # the next write cleans up the last one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "writer.py"]


def test_a_failing_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"previous export")

    def broken(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise ExportError("parity check failed")

    with pytest.raises(ExportError):
        atomic_write(path, broken)
    assert path.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    from transferkit.checkpoints import save_checkpoint

    path = save_checkpoint(tmp_path / "c.pt", model=torch.nn.Linear(4, 2), meta={"x": 1})
    data = path.read_bytes()
    for cut in (len(data) // 2, 10, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match="c.pt"):
            load_checkpoint(path)


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")


# -- file modes and fsync ------------------------------------------------------------------
@pytest.fixture
def umask():
    """Set the process umask for a test, restoring it after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(p: Path) -> int:
    return os.stat(p).st_mode & 0o777


def test_written_files_get_the_umask_mode_and_overwrites_keep_theirs(tmp_path, umask):
    from tests.export_helpers import export_tiny

    umask(0o022)
    assert _mode(atomic_write(tmp_path / "a.bin", lambda t: Path(t).write_bytes(b"1"))) == 0o644
    assert _mode(save_checkpoint(tmp_path / "c.pt", model=torch.nn.Linear(2, 2), meta={})) == 0o644
    export_tiny(tmp_path / "m.pt")
    assert _mode(tmp_path / "m.pt") == 0o644  # readable by a service running as another user
    umask(0o007)
    assert _mode(atomic_write(tmp_path / "b.bin", lambda t: Path(t).write_bytes(b"1"))) == 0o660
    os.chmod(tmp_path / "a.bin", 0o640)
    umask(0o022)
    atomic_write(tmp_path / "a.bin", lambda t: Path(t).write_bytes(b"2"))
    assert _mode(tmp_path / "a.bin") == 0o640 and (tmp_path / "a.bin").read_bytes() == b"2"
    os.chmod(tmp_path / "c.pt", 0o600)
    save_checkpoint(tmp_path / "c.pt", model=torch.nn.Linear(2, 2), meta={})
    assert _mode(tmp_path / "c.pt") == 0o600


def test_a_path_that_is_a_link_is_replaced_and_the_file_it_named_is_kept(tmp_path):
    """docs/reliability.md: an export or checkpoint path that is a symbolic link is replaced by
    the new file; the file the link named keeps its content."""
    (tmp_path / "v3.pt").write_bytes(b"old model")
    (tmp_path / "current.pt").symlink_to("v3.pt")
    atomic_write(tmp_path / "current.pt", lambda tmp: Path(tmp).write_bytes(b"new model"))
    assert not (tmp_path / "current.pt").is_symlink() and (tmp_path / "current.pt").read_bytes() == b"new model"
    assert (tmp_path / "v3.pt").read_bytes() == b"old model"


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    import stat

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(a, b):
        events.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "f.bin", lambda t: Path(t).write_bytes(b"x"))
    assert events == ["fsync file", "rename", "fsync dir"]


# -- temporary files of killed writers -------------------------------------------------------
def _fork_writer(target: Path, *, wait_for_go: bool = False):
    """A second process (forked) that starts ``atomic_write(target)``, writes 1 MB into its
    temporary, says so, then sleeps (or, with ``wait_for_go``, finishes when told). Returns
    ``(pid, go)``: ``go()`` lets it finish."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(ready_r)

            def write(tmp: str) -> None:
                Path(tmp).write_bytes(b"x" * 1_000_000)
                os.write(ready_w, b"1")
                if wait_for_go:
                    select.select([go_r], [], [], 60)  # never outlive a failed test by long
                else:
                    time.sleep(60)

            atomic_write(target, write)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    return pid, lambda: os.write(go_w, b"1")


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@needs_fork
def test_kill_loop_leaves_no_temporary_after_the_next_write(tmp_path):
    target = tmp_path / "run.ckpt"
    for _ in range(5):  # five writers killed with SIGKILL in the middle of their write
        pid, _go = _fork_writer(target)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        left = _temps(tmp_path)  # each writer removed the one its killed predecessor left, and left its own
        assert len(left) == 1 and left[0].startswith(".run.ckpt.tk-") and f"-{pid}-" in left[0]
    (tmp_path / ".other.tmp").write_bytes(b"not ours")  # temporaries of other targets or tools stay
    (tmp_path / ".model.pt.x.tmp").write_bytes(b"not ours")
    save_checkpoint(target, model=torch.nn.Linear(2, 2), meta={})
    assert _temps(tmp_path) == [".model.pt.x.tmp", ".other.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")) == ["run.ckpt"]


@needs_fork
def test_a_live_writers_temporary_is_left_alone(tmp_path):
    from transferkit._io import remove_stale_temps, remove_stale_temps_in

    target = tmp_path / "model.pt"
    pid, go = _fork_writer(target, wait_for_go=True)
    try:
        live = _temps(tmp_path)
        assert len(live) == 1
        atomic_write(target, lambda t: Path(t).write_bytes(b"mine"))  # a concurrent write cleans up, but not that
        assert remove_stale_temps(target) == [] and remove_stale_temps_in(tmp_path) == []
        assert _temps(tmp_path) == live
    finally:
        go()
        status = os.waitpid(pid, 0)[1]
    assert status == 0  # the other writer finished its rename undisturbed
    assert target.read_bytes() == b"x" * 1_000_000 and _temps(tmp_path) == []


def test_stale_temporary_folders_and_reused_pids(tmp_path):
    from transferkit._io import create_temp, owner_tag, remove_stale_temps, remove_stale_temps_in

    entry = tmp_path / "cache" / "abc123"
    entry.parent.mkdir()
    mine = create_temp(entry, directory=True)  # e.g. a feature-cache entry being built by this process
    (mine / "features.npy").write_bytes(b"0" * 100)
    host, pid, start = owner_tag().split("-")[1:]
    reused = entry.parent / f".abc123.tk-{host}-{pid}-{int(start) + 1}-0123abcd.tmp"  # same pid, another process
    reused.mkdir()
    (reused / "features.npy").write_bytes(b"0")
    foreign = entry.parent / f".abc123.tk-ffffff-{pid}-0-0123abcd.tmp"  # another host: cannot be checked
    foreign.write_bytes(b"0")
    assert remove_stale_temps(entry) == [reused]
    assert mine.is_dir() and foreign.exists()
    assert remove_stale_temps_in(entry.parent) == []


def test_a_write_check_that_a_killed_writer_left_is_removed_by_the_next_write(tmp_path):
    """Every atomic write first probes its folder (a temporary created and removed); a writer
    killed between the two leaves the probe, which the next write removes."""
    from transferkit._io import atomic_write, owner_tag

    host, pid, start = owner_tag().split("-")[1:]
    dead = tmp_path / f".tk-write-check.tk-{host}-999999999-{start}-0123abcd.tmp"  # a pid that runs nowhere here
    dead.write_bytes(b"")
    atomic_write(tmp_path / "model.pt", lambda tmp: Path(tmp).write_bytes(b"model"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_a_writer_in_another_pid_namespace_is_judged_by_its_temporarys_age_not_its_pid(tmp_path, monkeypatch):
    # containers sharing a host name and a folder, not their process ids: another namespace's
    # pid says nothing here. Its temporaries are left alone while they change, and removed once
    # untouched for FOREIGN_TEMP_AGE_S (a writer killed before its container restarted)
    import os
    import time

    from transferkit import _io

    entry = tmp_path / "entry"
    real = os.readlink
    monkeypatch.setattr(_io.os, "readlink", lambda p: "pid:[1]" if str(p) == "/proc/self/ns/pid" else real(p))
    theirs = _io.create_temp(entry)  # a file written "in the other container"
    folder = _io.create_temp(entry, directory=True)  # a cache entry being built there
    monkeypatch.undo()
    assert _io.owner_tag() not in theirs.name

    def dead(p):  # the same temporary, named for a pid that runs nowhere here
        f = p.name.split("-")  # .entry.tk, host, pid, start, random.tmp
        return p.rename(p.with_name("-".join([*f[:2], "999999999", *f[3:]])))

    theirs, folder = dead(theirs), dead(folder)
    (folder / "part.npy").write_bytes(b"0")
    assert _io.remove_stale_temps(entry) == [] and _io.remove_stale_temps_in(tmp_path) == []
    old = time.time() - _io.FOREIGN_TEMP_AGE_S - 60
    os.utime(theirs, (old, old))
    os.utime(folder, (old, old))  # the folder is old, but what is in it changed lately: still being built
    assert _io.remove_stale_temps(entry) == [theirs]
    os.utime(folder / "part.npy", (old, old))
    assert _io.remove_stale_temps_in(tmp_path) == [folder]
    # written before the namespace was in the tag: judged by its pid, as then
    legacy = tmp_path / f".entry.tk-{_io._plain_host_tag()}-999999999-0-0123abcd.tmp"
    legacy.write_bytes(b"0")
    assert _io.remove_stale_temps(entry) == [legacy]


# -- output paths ---------------------------------------------------------------------------
def test_check_writable_names_the_path_the_purpose_and_the_fix(tmp_path):
    from transferkit._io import check_writable
    from transferkit.errors import OutputError

    (tmp_path / "afile").write_text("x")
    cases = [
        (dict(path=tmp_path, what="export", flag="--export"), f"The export path '{tmp_path}' (--export) is a folder; "
                                                              f"give a file path such as '{tmp_path / 'model.pt'}'"),
        (dict(path=tmp_path / "afile" / "sub" / "m.pt", what="checkpoint"), f"'{tmp_path / 'afile'}' is a file, not "
                                                                           "a folder. Choose another path."),
        (dict(path=tmp_path / "afile" / "onnx" / "f.onnx", what="ONNX feature pass"),  # a path in cache_dir
         f"'{tmp_path / 'afile'}' is a file, not a folder. Move or remove that file"),
        (dict(path=tmp_path / "afile", what="plots", kind="dir"), "is a file, but a folder is needed"),
        # the path as given ('' was said as '.')
        (dict(path="", what="export", flag="--out"), "The export path '' (--out) is empty; give a file path."),
        (dict(path=tmp_path, what="checkpoint"), f"give a file path such as '{tmp_path / 'checkpoint.pt'}'"),
        (dict(path=tmp_path, what="plot"), f"give a file path such as '{tmp_path / 'plot.png'}'"),
        # a file transferkit names itself: no file name to suggest, the folder is in the way
        (dict(path=tmp_path, what="engine timing store"), f"'{tmp_path}' is a folder, where a file goes; move or "
                                                          "remove that folder."),
    ]
    for kwargs, message in cases:
        with pytest.raises(OutputError) as info:
            check_writable(**kwargs)
        assert message in str(info.value), str(info.value)
    assert check_writable(tmp_path / "new" / "deeper" / "m.pt", what="export") == tmp_path / "new" / "deeper" / "m.pt"
    assert check_writable(tmp_path / "plots", what="plots", kind="dir") == tmp_path / "plots"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing created, no probe left


def _as_nobody(fn) -> str:
    """Run ``fn()`` in a forked child without root's powers (root writes read-only folders);
    returns what it reported."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            os.write(w, fn().encode())
        except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
            import traceback

            os.write(w, ("child failed: " + traceback.format_exc()).encode())
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.waitpid(pid, 0)
    return out.decode()


@pytest.fixture
def open_folder():
    """A folder that an unprivileged user can reach (pytest's tmp_path is private to root)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="tk-ro-"))
    os.chmod(d, 0o755)
    yield d
    for p in d.rglob("*"):
        if p.is_dir():
            os.chmod(p, 0o755)
    shutil.rmtree(d)


@needs_fork
def test_a_read_only_folder_is_reported_before_anything_is_written(open_folder):
    from transferkit._io import check_writable
    from transferkit.errors import OutputError

    ro = open_folder / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    called = []

    def attempt() -> str:
        out = []
        for fn in (lambda: check_writable(ro / "m.pt", what="export", flag="--export"),
                   lambda: check_writable(ro / "sub" / "m.pt", what="checkpoint"),
                   lambda: atomic_write(ro / "m.pt", lambda t: called.append(t), what="export")):
            try:
                fn()
                out.append("no error")
            except OutputError as exc:
                out.append(str(exc))
        out.append(f"write called: {bool(called)}")
        return "\n".join(out)

    lines = _as_nobody(attempt).splitlines()
    assert not lines[0].startswith("child failed"), "\n".join(lines)
    assert f"The export path '{ro / 'm.pt'}' (--export) cannot be written: its folder is not writable " \
           "(permission denied)" in lines[0]
    assert f"its nearest existing folder '{ro}' is not writable" in lines[1]
    assert "cannot be written" in lines[2] and str(ro / "m.pt") in lines[2]
    assert lines[3] == "write called: False" and list(ro.iterdir()) == []


def test_writing_onto_a_folder_names_the_target_not_the_temporary(tmp_path):
    from tests.export_helpers import export_tiny

    from transferkit.errors import OutputError

    target = tmp_path / "x"
    target.mkdir()
    for write in (lambda: export_tiny(target), lambda: save_checkpoint(target, model=torch.nn.Linear(2, 2), meta={})):
        with pytest.raises(OutputError) as info:
            write()
        assert f"'{target}'" in str(info.value) and "is a folder" in str(info.value) and ".tmp" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"] and not list(target.iterdir())


def test_a_failed_final_write_keeps_the_trained_weights(tmp_path, monkeypatch):
    from tests.export_helpers import images, tiny_model

    from transferkit.errors import OutputError
    from transferkit.export import export_checkpoint, export_torchscript
    from transferkit.checkpoints import save_with_fallback

    model, bb = tiny_model(2)
    meta = {"labels": ["a", "b"], "input_spec": bb.input_spec.replace(image_size=16).to_dict(),
            "training": {"backbone": bb.name}}
    target = tmp_path / "x"
    target.mkdir()  # --export /tmp/x where /tmp/x is a folder
    with pytest.raises(OutputError) as info:
        save_with_fallback(target, lambda: export_torchscript(model, target, metadata=meta,
                                                              example_inputs=images(2, 16)),
                           what="export", flag="--export", model=model, meta=meta)
    err = info.value
    assert err.target == target and err.fallback.parent == tmp_path and err.fallback.name.startswith("x.unsaved-")
    msg = str(err)
    assert f"Could not write the export '{target}' (--export): The export path" in msg and "is a folder" in msg
    assert f"The trained weights are saved in '{err.fallback}'" in msg and "transferkit export" in msg
    assert f"`transferkit export {err.fallback} --out {target}`" in msg  # the export asked for, not a placeholder
    with pytest.raises(OutputError) as info:  # the final checkpoint: exported to the run's own export path
        save_with_fallback(target, lambda: torch.save({}, target), what="checkpoint", flag="--checkpoint",
                           export=tmp_path / "run.pt", model=model, meta=meta)
    assert f"--out {tmp_path / 'run.pt'}` (in Python: " in str(info.value)
    saved = load_checkpoint(err.fallback)
    assert all(torch.equal(saved["model"][k], v) for k, v in model.state_dict().items())
    reports, _ = export_checkpoint(err.fallback, tmp_path / "ok.pt")  # the advice works
    assert reports[0].max_abs_diff <= reports[0].tolerance
    # the target's folder cannot hold the fallback either: it goes to the current folder
    (tmp_path / "afile").write_text("")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(OutputError) as info:
        save_with_fallback(tmp_path / "afile" / "run.ckpt",
                           lambda: save_checkpoint(tmp_path / "afile" / "run.ckpt", model=model, meta=meta),
                           what="checkpoint", model=model, meta=meta)
    assert info.value.fallback.parent == tmp_path / "cwd" and load_checkpoint(info.value.fallback)["model"]

    def parity_failure():
        raise ExportError("The exported model differs from the eager model by 3 (> tolerance 1e-05).")

    with pytest.raises(ExportError, match="differs from the eager model by 3 .*The trained weights are saved in"):
        save_with_fallback(tmp_path / "m.pt", parity_failure, what="export", model=model, meta=meta)


# -- one writer per checkpoint ---------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from transferkit.checkpoints import checkpoint_lock
    with checkpoint_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_a_second_process_on_the_same_checkpoint_gets_a_clear_error(tmp_path):
    from transferkit._io import lock_path
    from transferkit.errors import FileLockedError
    from transferkit.checkpoints import checkpoint_lock

    path = tmp_path / "run.ckpt"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(FileLockedError) as info:
            save_checkpoint(path, model=torch.nn.Linear(2, 2), meta={})
        msg = str(info.value)
        assert f"The checkpoint '{path}' is being written by process {proc.pid}" in msg and "another checkpoint" in msg
        assert not path.exists()
    finally:
        proc.send_signal(signal.SIGKILL)  # a holder killed -9 leaves its lock file: it must not block
        proc.wait(timeout=30)
    assert lock_path(path).exists()
    with checkpoint_lock(path):
        save_checkpoint(path, model=torch.nn.Linear(2, 2), meta={"x": 1})  # re-entrant inside the run's lock
        assert lock_path(path).exists()
    assert not lock_path(path).exists() and load_checkpoint(path)["transferkit"] == {"x": 1}


JSON_WRITER = textwrap.dedent("""
    import sys
    from transferkit._io import update_json_object
    path, tag = sys.argv[1], sys.argv[2]
    print("ready", flush=True)
    sys.stdin.readline()                       # both start together
    for i in range(80):
        update_json_object(path, f"{tag}-{i}", {"i": i}, what="timing store")
""")


def test_runs_updating_one_timing_store_at_once_keep_every_key(tmp_path):
    """The read, change and write of a JSON store (``engines.json``) hold its lock: two
    processes adding keys at once lose none (without the lock, about half were lost)."""
    import json

    script, store = tmp_path / "writer.py", tmp_path / "engines.json"
    script.write_text(JSON_WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), str(store), tag], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for tag in "ab"]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert sorted(json.loads(store.read_text())) == sorted(f"{t}-{i}" for t in "ab" for i in range(80))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no lock or temporary left


def test_two_fallback_saves_in_the_same_second_keep_both(tmp_path, monkeypatch):
    """The fallback names carry the time to the second: two runs whose final writes fail in the
    same second kept one file of the two."""
    from transferkit.checkpoints import fallback_paths, save_fallback

    monkeypatch.chdir(tmp_path)
    candidates = fallback_paths(tmp_path / "m.pt")
    saved = [save_fallback(candidates, model=torch.nn.Linear(2, k), meta={"run": k})[0] for k in (1, 2)]
    assert saved[0] != saved[1] and saved[1].name.endswith("-2.pt")
    assert [load_checkpoint(p)["transferkit"]["run"] for p in saved] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in saved)  # no empty claim left
    for p in saved:
        p.unlink()
    candidates[0].touch()  # another run's claim, its weights still being written
    mine = save_fallback(candidates, model=torch.nn.Linear(2, 3), meta={"run": 3})[0]
    assert mine.name.endswith("-2.pt") and candidates[0].stat().st_size == 0  # theirs is not replaced
    # such weights hold no training state: exported without a word about finishing a run
    from transferkit.checkpoints import saved_run

    assert saved_run(mine)[1]["resumable"] is False and saved_run(mine)[1]["complete"] is False


def test_ctrl_c_inside_a_checkpoint_write_is_an_interrupt_not_a_write_failure(tmp_path, monkeypatch):
    """torch turns an exception raised in its write callback into RuntimeError("unexpected pos ..."),
    which reads as a failed disk; the Ctrl-C (or SIGTERM as one) is raised as itself."""
    path = tmp_path / "run.ckpt"
    model = torch.nn.Linear(256, 256)
    save_checkpoint(path, model=model, meta={"i": 0})
    before = path.read_bytes()
    class Interrupted:  # the file under the writer: a signal lands in the middle of its third write
        def __init__(self, f):
            self.f, self.calls = f, 0

        def write(self, b):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    init = io_._AllOrError.__init__
    monkeypatch.setattr(io_._AllOrError, "__init__", lambda self, f: init(self, Interrupted(f)))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model=model, meta={"i": 1})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]


def test_ctrl_c_just_after_the_rename_says_the_file_is_complete(tmp_path, monkeypatch):
    from transferkit._signals import TrainingInterrupted
    from transferkit.checkpoints import save_with_fallback

    path, model = tmp_path / "run.ckpt", torch.nn.Linear(4, 4)

    def interrupted(folder):  # the signal lands while the folder is synced, after the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(io_, "_fsync_dir", interrupted)
    with pytest.raises(TrainingInterrupted, match=r"just after the checkpoint '.*run.ckpt' \(checkpoint\) was "
                                                  r"written: it is complete") as info:
        save_with_fallback(path, lambda: save_checkpoint(path, model=model, meta={"i": 1}), what="checkpoint",
                           flag="checkpoint", model=model, meta={})
    assert info.value.checkpoint == path and load_checkpoint(path)["transferkit"] == {"i": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]  # no fallback copy: nothing was lost
