"""Ctrl-C and SIGTERM at each write of a run: the trained weights are kept in a named file.

The signals are real: the child process sends them to itself at the chosen moment (inside
the export, inside a checkpoint write, inside the fallback save), or the test sends SIGTERM
from outside while the run trains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import transferkit as tk
from transferkit.checkpoints import load_checkpoint
from transferkit.train.faults import TrainingInterrupted

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

FAST = dict(backbone="tk:small_cnn", weights=None, policy="finetune", batch_size=8, augment="none", verbose=False,
            num_workers=0, image_size=16, precision="fp32")
LOUD = ["--backbone", "tk:small_cnn", "--weights", "none", "--policy", "finetune", "--batch-size", "8",
        "--augment", "none", "--image-size", "16", "--precision", "fp32", "--set", "num_workers=0"]
CLI = [*LOUD, "--set", "verbose=false"]

CHILD = """
    import os, signal, sys
    import transferkit.export.torchscript as ts
    import transferkit.checkpoints as ck
    from transferkit.cli import main
    import transferkit.api  # noqa: F401  (loads transferkit.steps)

    mode, args = sys.argv[1], sys.argv[2:]
    sig = signal.SIGTERM if "term" in mode else signal.SIGINT
    if mode.startswith("export"):  # the signal arrives while the export is being written
        real = ts.atomic_write

        def atomic_write(path, write, **kw):
            def interrupted(tmp):
                os.kill(os.getpid(), sig)
                write(tmp)
            return real(path, interrupted, **kw)

        ts.atomic_write = atomic_write
    if mode.startswith("fallback"):  # Ctrl-C during the export, then again while the weights are saved
        steps = sys.modules["transferkit.steps"]
        real_export, real_fallback = steps.export_torchscript, ck.save_fallback

        def export(*a, **k):
            os.kill(os.getpid(), signal.SIGINT)
            return real_export(*a, **k)

        def save_fallback(*a, **k):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            return real_fallback(*a, **k)

        steps.export_torchscript = export
        ck.save_fallback = save_fallback
    if mode.startswith("checkpoint"):  # the signal arrives while the second epoch's checkpoint is written
        real_save, calls = ck.torch.save, []

        def save(obj, f, *a, **k):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), sig)
            return real_save(obj, f, *a, **k)

        ck.torch.save = save
    if mode.startswith("epoch"):  # the signal arrives during training (from a callback)
        import transferkit.train.loop as loop
        real_epoch = loop.train_one_epoch

        def train_one_epoch(*a, **k):
            out = real_epoch(*a, **k)
            os.kill(os.getpid(), sig)
            return out

        loop.train_one_epoch = train_one_epoch
    sys.exit(main(args))
"""


def _run(tmp_path: Path, mode: str, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, str(script), mode, *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)


def _saved(stderr: str) -> Path:
    """The file the one-line message names as holding the weights."""
    line = stderr.strip().splitlines()[-1]
    for marker in ("saved in '", "saved to '"):
        if marker in line:
            return Path(line.split(marker, 1)[1].split("'", 1)[0])
    raise AssertionError(f"no saved file named in {line!r}")


@pytest.mark.parametrize("sig", ["int", "term"])
def test_a_signal_during_the_export_keeps_the_weights(tmp_path, image_folder, sig):
    r = _run(tmp_path, f"export-{sig}", "finetune", "--data", str(image_folder), "--epochs", "1",
             "--export", str(tmp_path / "m.pt"), *CLI)
    assert r.returncode == (130 if sig == "int" else 143), r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    name = "Ctrl-C" if sig == "int" else "SIGTERM"
    assert line.startswith(f"transferkit: Interrupted ({name}) while writing the export "
                           f"'{tmp_path / 'm.pt'}' (export); nothing was written there."), line
    saved = _saved(r.stderr)
    assert saved.is_file() and load_checkpoint(saved)["model"]
    assert not (tmp_path / "m.pt").exists() and not list(tmp_path.glob(".m.pt.tk-*"))


def test_ctrl_c_again_while_the_weights_are_saved_does_not_lose_them(tmp_path, image_folder):
    r = _run(tmp_path, "fallback", "finetune", "--data", str(image_folder), "--epochs", "1",
             "--export", str(tmp_path / "m.pt"), *CLI)
    assert r.returncode == 130, r.stderr[-3000:]
    assert "while writing the export" in r.stderr
    assert load_checkpoint(_saved(r.stderr))["model"]


@pytest.mark.parametrize("sig", ["int", "term"])
def test_a_signal_during_a_checkpoint_write_keeps_the_last_one(tmp_path, image_folder, sig):
    ckpt = tmp_path / "run.ckpt"
    r = _run(tmp_path, f"checkpoint-{sig}", "finetune", "--data", str(image_folder), "--epochs", "3",
             "--checkpoint", str(ckpt), *CLI)
    assert r.returncode == (130 if sig == "int" else 143), r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert f"The checkpoint '{ckpt}' holds the last completed epoch" in line
    assert ("SIGTERM" in line) == (sig == "term")
    assert load_checkpoint(ckpt)["epoch"] == 1  # epoch 2's write was interrupted; epoch 1's file is intact
    assert not list(tmp_path.glob(".run.ckpt.tk-*"))
    resumed = tk.resume(ckpt, verbose=False)
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]


def test_sigterm_during_training_without_a_checkpoint_keeps_the_weights(tmp_path, image_folder):
    r = _run(tmp_path, "epoch-term", "finetune", "--data", str(image_folder), "--epochs", "3", *CLI)
    assert r.returncode == 143, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("transferkit: Interrupted (SIGTERM). The current weights were saved to")
    assert load_checkpoint(_saved(r.stderr))["model"]


def _sigterm_while_training(tmp_path: Path, image_folder: Path, *options: str, after: str = "epoch",
                            whole_job: bool = False) -> tuple[int, str, str]:
    """A CLI run, sent SIGTERM from another process once a stderr line starts with ``after``
    (``whole_job``: to its whole process group, as Slurm and systemd do): (exit code, the
    output before, the output after)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "transferkit", "finetune", "--data", str(image_folder),
                             "--epochs", "200", *LOUD, *options], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=env, cwd=tmp_path, start_new_session=whole_job)
    try:
        lines = []
        deadline = time.time() + 240
        while time.time() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if line.startswith(after) or not line:
                break
        if whole_job:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        return proc.wait(timeout=120), "".join(lines), rest
    finally:
        if proc.poll() is None and whole_job:
            os.killpg(proc.pid, signal.SIGKILL)
        elif proc.poll() is None:
            proc.kill()


def test_sigterm_from_outside_while_training(tmp_path, image_folder):
    """What a scheduler does: SIGTERM from another process while the run trains."""
    code, lines, rest = _sigterm_while_training(tmp_path, image_folder)
    assert code == 143, lines[-2000:] + rest[-2000:]
    last = rest.strip().splitlines()[-1]
    assert last.startswith("transferkit: Interrupted (SIGTERM)."), last
    assert load_checkpoint(_saved(rest))["model"]


def test_sigterm_to_the_whole_job_with_loader_workers_keeps_the_weights(tmp_path, image_folder):
    """What Slurm and systemd do: SIGTERM to every process of the job, DataLoader workers included
    (a worker killed by it was reported as a crash while the weights were being saved: exit 1, an
    empty weights file)."""
    code, lines, rest = _sigterm_while_training(tmp_path, image_folder, "--set", "num_workers=2",
                                                after="epoch   2", whole_job=True)  # the workers are up by then
    assert code == 143, lines[-2000:] + rest[-2000:]
    assert "killed by signal" not in rest and "Traceback" not in rest, rest[-2000:]
    assert load_checkpoint(_saved(rest))["model"]


def test_sigterm_in_python_is_a_training_interrupted(tmp_path, image_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def terminate(row):
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match=r"Interrupted \(SIGTERM\)\. The current weights were saved") as info:
        tk.finetune(data=image_folder, epochs=2, callbacks=[terminate], **FAST)
    assert info.value.checkpoint.is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handler is gone


def test_a_signal_after_training_keeps_the_weights(tmp_path, image_folder, monkeypatch):
    """Ctrl-C during the evaluation that follows training: the trained weights are saved."""
    import transferkit.api as api

    monkeypatch.chdir(tmp_path)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "evaluate", interrupted)
    with pytest.raises(TrainingInterrupted, match=r"Interrupted \(Ctrl-C\) after training\. The trained weights") as info:
        tk.finetune(data=image_folder, epochs=1, export=tmp_path / "m.pt", **FAST)
    saved = info.value.checkpoint
    assert saved == tmp_path / "m.interrupted.pt"
    model = load_checkpoint(saved)["model"]
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


def test_terminate_at_once_restores_the_default_only_over_transferkit_s_own_handler():
    """Joining the process group ends on SIGTERM at once where finetune installed its handler;
    a handler the program installed itself stays in place."""

    from transferkit._signals import terminate_as_interrupt, terminate_at_once

    with terminate_as_interrupt():
        ours = signal.getsignal(signal.SIGTERM)
        assert ours is not signal.SIG_DFL
        with terminate_at_once():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is ours

    def own(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, own)
    try:
        with terminate_at_once():
            assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_while_the_command_line_imports_torch_acts_once_the_import_is_whole(monkeypatch, capsys):
    """A Ctrl-C inside torch's import left half-imported modules ("module 'numpy' has no
    attribute 'matrix'", a traceback) or was swallowed by an import's own except (the run went
    on): it is held until the import is whole, then the command exits 130."""
    import importlib
    import signal

    from transferkit import cli

    done = []

    def interrupted_import(name):
        signal.raise_signal(signal.SIGINT)  # arrives inside the import
        done.append(name)

    monkeypatch.setattr(importlib, "import_module", interrupted_import)
    with pytest.raises(KeyboardInterrupt):
        cli._import_torch()
    assert done == ["torch"]  # the import finished first
    assert cli.main(["backbones"]) == 130 and capsys.readouterr().err == "transferkit: interrupted (Ctrl-C)\n"
    assert done == ["torch", "torch"]


def test_a_rank_that_does_not_join_in_time_is_one_line(monkeypatch):
    """A rank started later than TRANSFERKIT_DIST_TIMEOUT: rank 0 printed torch's DistStoreError
    with 85 lines of C++ frames, exit 1."""
    import torch.distributed as dist

    from transferkit.train import distributed

    def late(*a, **k):
        raise dist.DistStoreError("wait timeout after 4000ms, keys: /default_pg/0//cpu//0/1\nException raised from ...")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TRANSFERKIT_DIST_TIMEOUT", "4")
    monkeypatch.setattr(dist, "init_process_group", late)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(distributed.DistributedError, match=r"^Rank 0: the 2 processes of the job did not all join "
                                                           r"within 4 s \(wait timeout after 4000ms, keys: [^\n]*\)\. "
                                                           r".*raise the limit with TRANSFERKIT_DIST_TIMEOUT"):
        distributed.init_distributed(torch.device("cpu"))


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_while_the_first_is_handled_does_not_lose_the_weights(tmp_path, image_folder, monkeypatch,
                                                                             second):
    """A scheduler that signals the whole process group, or Ctrl-C pressed twice: the second
    signal, landing while the first one's handler had not yet held the signals, was raised into
    it, and the weights it was about to save were lost (57 epochs, in a run without checkpoint)."""
    import transferkit.train.faults as faults

    monkeypatch.chdir(tmp_path)
    real, stopped = faults._identity, []

    def identity_then_a_second_signal(path):  # what the handler of the first reads first: a second lands there
        if stopped and len(stopped) == 1:
            stopped.append(second)
            signal.raise_signal(second)
        return real(path)

    def interrupt(row):
        stopped.append(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(faults, "_identity", identity_then_a_second_signal)
    with pytest.raises(TrainingInterrupted, match=r"Interrupted \(Ctrl-C\)\. The current weights were saved") as info:
        tk.finetune(data=image_folder, epochs=2, callbacks=[interrupt], **FAST)
    assert stopped == [signal.SIGINT, second] and load_checkpoint(info.value.checkpoint)["model"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's handlers are gone
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("stub, ending", [
    ("import transferkit.cli as m\nm.main = lambda argv=None: 143\n", "m.console_main()"),  # transferkit COMMAND
    ("import transferkit.recipes as m\nm.main_guard = lambda fn: 143\n", "m.recipe_main(lambda: None)"),  # a recipe
])
def test_a_signal_after_an_interruption_was_said_does_not_change_the_exit_status(stub, ending):
    """A second SIGTERM (a scheduler's, to the whole job) landing after the interruption's line was
    printed ended the process by the signal (exit -15) instead of 143."""
    code = (f"import signal, sys\n{stub}exit_ = sys.exit\n"
            "def late_signal(status):\n    signal.raise_signal(signal.SIGTERM)\n    exit_(status)\n"
            f"sys.exit = late_signal\n{ending}\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 143, (done.returncode, done.stderr[-2000:])


def _ended(pid: int) -> bool:
    """Whether process ``pid`` has ended (gone, or a zombie its new parent has not reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_command_asks_to_end_with_its_torchrun_launcher_as_it_starts(tmp_path):
    """`transferkit` started by torchrun asks for SIGTERM on its launcher's death as the command
    starts, before any run joins its job (a worker still reading its data when torchrun was
    killed went on, unseen): here the command's work is a sleep, and its launcher is killed."""
    ready = tmp_path / "ready"
    worker = ("import time, transferkit.cli as cli\n"
              f"cli.main = lambda argv=None: open({str(ready)!r}, 'w').close() or time.sleep(120) or 0\n"
              "cli.console_main()\n")
    launcher = ("import subprocess, sys, time\n"
                f"p = subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True)\n"
                "print(p.pid, flush=True)\n"
                "time.sleep(120)\n")
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", launcher], env=env, stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    try:
        for _ in range(600):  # the command has started (a hang guard: at most 60 s)
            if ready.exists():
                break
            time.sleep(0.1)
        assert ready.exists()
        proc.kill()
        proc.wait(timeout=60)
        for _ in range(300):  # SIGTERM ends it at once; a worker left running sleeps 120 s
            if _ended(pid):
                break
            time.sleep(0.1)
        assert _ended(pid)
    finally:
        proc.kill()
        if not _ended(pid):
            os.kill(pid, signal.SIGKILL)
