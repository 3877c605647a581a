"""Ctrl-C, a diverging loss and running out of memory: the work is kept and the message says what to do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import transferkit as tk
from transferkit.backbones import InputSpec, from_module
from transferkit.train.faults import TrainingInterrupted

pytestmark = pytest.mark.precision_auto  # the outcome depends on what the CPU's bf16 support decides

FAST = dict(weights=None, policy="full", batch_size=8, augment="none", verbose=False, num_workers=0,
            image_size=16, lr=3e-3)


def _interrupt_after(epoch: int):
    def callback(row: dict) -> None:
        if row["epoch"] == epoch:
            raise KeyboardInterrupt

    return callback


def test_ctrl_c_with_checkpoint_resumes_to_the_same_weights(image_folder, tmp_path):
    ckpt = tmp_path / "run.pt"
    with pytest.raises(TrainingInterrupted, match="resume") as info:
        tk.finetune("tk:small_cnn", data=image_folder, epochs=3, checkpoint=ckpt, callbacks=[_interrupt_after(1)],
                    **FAST)
    assert info.value.checkpoint == ckpt
    resumed = tk.resume(ckpt)
    straight = tk.finetune("tk:small_cnn", data=image_folder, epochs=3, **FAST)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for (name, a), (_, b) in zip(resumed.model.state_dict().items(), straight.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_ctrl_c_without_checkpoint_keeps_the_weights(image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrainingInterrupted, match="transferkit-interrupted.pt") as info:
        tk.finetune("tk:small_cnn", data=image_folder, epochs=2, callbacks=[_interrupt_after(1)], **FAST)
    saved = info.value.checkpoint
    assert saved.is_file()
    bb = tk.get_backbone("tk:small_cnn", weights=saved)  # the trunk of the interrupted run
    assert bb.weights == str(saved)
    first = saved.read_bytes()
    with pytest.raises(TrainingInterrupted, match="transferkit-interrupted-2.pt") as again:  # a second job, same folder
        tk.finetune("tk:small_cnn", data=image_folder, epochs=2, callbacks=[_interrupt_after(1)], **FAST)
    assert again.value.checkpoint == tmp_path / "transferkit-interrupted-2.pt" and again.value.checkpoint.is_file()
    assert saved.read_bytes() == first  # the first job's weights are not replaced
    with pytest.raises(tk.ConfigError, match=r"holds weights without a run's training state \(weights saved when a run "
                                             r"was interrupted.*finetune\(\.\.\., backbone='tk:small_cnn', weights="):
        tk.resume(saved)


def test_interrupted_weights_that_cannot_be_saved_at_their_name_leave_no_empty_file_there(tmp_path, monkeypatch):
    import transferkit.checkpoints as checkpoints
    from transferkit.errors import OutputError

    monkeypatch.chdir(tmp_path)
    real = checkpoints.save_checkpoint

    def full_here(path, **kw):
        if Path(path).parent == tmp_path:
            raise OutputError(f"Cannot write {path}: no space left on the device")
        return real(path, **kw)

    monkeypatch.setattr(checkpoints, "save_checkpoint", full_here)
    monkeypatch.setattr(checkpoints, "fallback_paths", lambda target: [tmp_path / "elsewhere" / "w.pt"])
    (tmp_path / "elsewhere").mkdir()
    saved = checkpoints.save_interrupted_weights(tmp_path / "transferkit-interrupted.pt", model=torch.nn.Linear(2, 2),
                                                 meta={})
    assert saved == tmp_path / "elsewhere" / "w.pt" and sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]


def test_interrupted_weights_whose_save_is_cut_short_leave_no_empty_file(tmp_path, monkeypatch):
    import transferkit.checkpoints as checkpoints

    def worker_died(*a, **k):  # what a DataLoader worker's death, reported in the middle of the save, raises
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

    monkeypatch.setattr(checkpoints, "save_fallback", worker_died)
    with pytest.raises(RuntimeError, match="killed by signal"):
        checkpoints.save_interrupted_weights(tmp_path / "transferkit-interrupted.pt", model=torch.nn.Linear(2, 2),
                                             meta={})
    assert list(tmp_path.iterdir()) == []  # not a 0-byte file that reads as saved weights


def test_ctrl_c_before_the_first_epoch_with_a_checkpoint_path_says_it_was_not_written(image_folder, tmp_path,
                                                                                     monkeypatch):
    import transferkit.train.loop as loop

    forward_backward, calls = loop._forward_backward, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the first step
            raise KeyboardInterrupt
        return forward_backward(*args, **kwargs)

    monkeypatch.setattr(loop, "_forward_backward", interrupted)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrainingInterrupted, match="was not written yet") as info:
        tk.finetune("tk:small_cnn", data=image_folder, epochs=2, checkpoint=tmp_path / "run.pt", **FAST)
    assert "Pass checkpoint=" not in str(info.value) and info.value.checkpoint.is_file()

    def before_a_step(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_one_epoch", before_a_step)
    with pytest.raises(TrainingInterrupted, match=r"Training had not started.*none were saved \(the checkpoint "
                                                  r"'.*run2\.pt' was not written yet\)") as info:
        tk.finetune("tk:small_cnn", data=image_folder, epochs=2, checkpoint=tmp_path / "run2.pt", **FAST)
    assert info.value.checkpoint is None and not (tmp_path / "run2.pt").exists()
    assert "cache_dir" not in str(info.value)
    with pytest.raises(TrainingInterrupted, match=r"none were saved\. Run it again to train; what it computed into "
                                                  r"cache_dir '.*fc' \(features, decoded images\) is kept and reused"):
        tk.finetune("tk:small_cnn", data=image_folder, epochs=2, cache_dir=tmp_path / "fc", **FAST)


def test_diverging_loss_points_at_the_lr_and_keeps_the_last_good_checkpoint(image_folder, tmp_path):
    from transferkit.checkpoints import load_checkpoint

    ckpt = tmp_path / "run.pt"
    tk.finetune("tk:small_cnn", data=image_folder, epochs=1, checkpoint=ckpt, **FAST)
    with pytest.raises(tk.TrainingError, match=r"(?s)learning rate") as info:
        tk.finetune("tk:small_cnn", data=image_folder, epochs=3, checkpoint=ckpt,
                    **{**FAST, "lr": 1e12, "optimizer": "sgd"})
    if "last good checkpoint" not in str(info.value):  # diverged before this run wrote an epoch: the file at
        assert load_checkpoint(ckpt)["transferkit"]["decisions"]["lr"] != 1e12  # its path is the earlier run's, kept
    kept = load_checkpoint(ckpt)  # whichever epoch it holds, it is whole and finite
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


class _SmallMemory(nn.Module):
    """Pretends the device runs out of memory for batches larger than 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.pool(self.conv(x)).flatten(1)


def test_out_of_memory_suggests_a_batch_size_that_fits(image_folder):
    bb = from_module(_SmallMemory(), num_features=4, input_spec=InputSpec(image_size=16), name="small-memory")
    with pytest.raises(tk.TrainingError, match="batch_size=2 fits"):
        tk.finetune(bb, data=image_folder, epochs=1, **{k: v for k, v in FAST.items() if k != "weights"})


def test_a_batch_of_one_at_a_batchnorm_that_sees_1x1_says_so(image_folder):
    """torch's ValueError ("Expected more than 1 value per channel when training") came raw,
    at the first step, after the plan had accepted the run."""
    trunk = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten())
    bb = from_module(trunk, num_features=4, input_spec=InputSpec(image_size=16), name="one-by-one")
    kw = {**{k: v for k, v in FAST.items() if k not in ("weights", "batch_size", "policy")}, "batch_size": 1,
          "epochs": 1}
    with pytest.raises(tk.TrainingError, match=r"A BatchNorm layer that trains saw one value per channel \(input size "
                                               r"torch.Size\(\[1, 4, 1, 1\]\)\): batch_size=1 .*\(add ',bn=affine'"):
        tk.finetune(bb, data=image_folder, policy="full", **kw)
    tk.finetune(from_module(trunk, num_features=4, input_spec=InputSpec(image_size=16), name="one-by-one"),
                data=image_folder, policy="full,bn=frozen", **kw)  # the advice works


class _NaNWhenEvaluated(nn.Module):
    """Finite in training, NaN in eval mode: a model that diverged between two validations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.conv(x)).flatten(1)
        return out if self.training else out * float("nan")


def test_a_model_whose_validation_loss_is_not_finite_stops_the_run(image_folder):
    """Its weights finite, its outputs NaN: the run used to end with exit 0 and a NaN model."""
    bb = from_module(_NaNWhenEvaluated(), num_features=4, input_spec=InputSpec(image_size=16), name="nan-eval")
    with pytest.raises(tk.TrainingError, match="The validation loss became nan at epoch 1: the model diverged"):
        tk.finetune(bb, data=image_folder, epochs=2, **{k: v for k, v in FAST.items() if k != "weights"})
    with pytest.raises(tk.PolicyError, match="l2sp must be a finite number >= 0, got inf"):
        tk.finetune("tk:small_cnn", data=image_folder, epochs=1, **{**FAST, "policy": "full,l2sp=inf"})


def test_ctrl_c_during_the_feature_pass_saves_nothing_and_says_so(image_folder, tmp_path, monkeypatch):
    import transferkit.steps as steps

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(steps, "cached_features", interrupted)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(TrainingInterrupted, match="Training had not started") as info:
        tk.finetune("tk:small_cnn", data=image_folder, epochs=2, **{**FAST, "policy": "feature_extraction"})
    assert info.value.checkpoint is None and list(cwd.iterdir()) == []


@pytest.mark.parametrize("at_step, saved", [(1, False), (2, True)])
def test_ctrl_c_before_the_first_optimizer_step_saves_nothing(image_folder, tmp_path, monkeypatch, at_step, saved):
    """Interrupted in its first batch, a trained run saved the weights it started from (a
    random head) as "the current weights"; after one step it keeps them."""
    from transferkit.train import loop as loop_mod

    forward_backward, calls = loop_mod._forward_backward, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_step:
            raise KeyboardInterrupt
        return forward_backward(*args, **kwargs)
    monkeypatch.setattr(loop_mod, "_forward_backward", interrupted)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrainingInterrupted) as info:
        tk.finetune("tk:small_cnn", data=image_folder, epochs=2, **{**FAST, "policy": "full"})
    assert (info.value.checkpoint is not None) is saved and ("Training had not started" in str(info.value)) is not saved
    assert bool(list(tmp_path.glob("*.pt"))) is saved, list(tmp_path.iterdir())


@pytest.mark.parametrize("failure, said", [
    ("[gloo] Read error: Connection reset by peer", "another rank ended without an error of its own"),
    ("[gloo] Application timeout caused pair closure", "a collective operation waited more than 1800 s"),
    ("barrier: Ranks 1 failed to pass monitoredBarrier", "another rank failed or ended while this one waited"),
])
def test_rank_0_keeps_the_weights_where_another_rank_was_killed_or_stalled(tmp_path, monkeypatch, failure, said):
    """torchrun, no checkpoint, rank 1 killed (out of memory) or stuck: rank 0 stopped on its failed
    collective with nothing saved, and rank 1, ended by torchrun's SIGTERM, said rank 0 saves them."""
    import itertools

    import transferkit.train.distributed as distributed
    import transferkit.train.faults as faults
    from transferkit.errors import TrainingError
    from transferkit.train.distributed import DistInfo, rank_guard

    monkeypatch.setattr(distributed, "_store_for", lambda info: torch.distributed.HashStore())
    monkeypatch.setattr(distributed, "_generation", itertools.count(3))
    saved = tmp_path / "transferkit-interrupted.pt"

    def fail():
        if failure.startswith("barrier: "):  # the end of an epoch's barrier, as `barrier` words it
            raise distributed.DistributedError("Rank 0: another rank failed or ended while this one waited for it at "
                                               "a barrier.") from RuntimeError(failure)
        raise RuntimeError(failure)

    for checkpoint, started, kept in ((None, True, True), (None, False, False), (tmp_path / "run.ckpt", True, False)):
        calls = []

        def save():
            calls.append(1)
            return saved

        with pytest.raises(TrainingError, match=said) as info:  # (with a checkpoint of this run, it is named)
            with rank_guard(DistInfo(rank=0, world_size=2, timeout_s=1800), grace_s=60):
                with faults.training_faults(checkpoint=checkpoint, batch_size=4, save_interrupted=save,
                                            probe_step=None, started=lambda: started):
                    if checkpoint is not None:  # this run's checkpoint holds the last epoch: nothing more to keep
                        checkpoint.write_bytes(b"epoch")
                    fail()
        assert calls == ([1] if kept else []), (checkpoint, started)
        assert str(info.value).endswith(f" The current weights were saved to {str(saved)!r} (usable as weights=... "
                                        "or with `transferkit export`).") == kept

    if failure.startswith("barrier: "):  # another rank's recorded failure is still named first
        store = torch.distributed.HashStore()
        monkeypatch.setattr(distributed, "_store_for", lambda info: store)
        monkeypatch.setattr(distributed, "_generation", itertools.count(50))
        store.set("transferkit/rank_guard/50/first", "rank 1 failed: ValueError: boom in rank 1's data")
        with pytest.raises(distributed.DistributedError, match=r"^Rank 0 stops because rank 1 failed: ValueError: boom "
                                                               r"in rank 1's data \(here: .* The current weights were "
                                                               r"saved to"):
            with rank_guard(DistInfo(rank=0, world_size=2, timeout_s=1800), grace_s=60):
                with faults.training_faults(checkpoint=None, batch_size=4, save_interrupted=lambda: saved,
                                            probe_step=None):
                    fail()
        monkeypatch.setattr(distributed, "_store_for", lambda info: torch.distributed.HashStore())

    def full_disk():
        raise OSError(28, "No space left on device")

    with pytest.raises(distributed.DistributedError, match=r"The current weights could not be saved: \[Errno 28\] "
                                                           r"No space left on device\.$"):
        with rank_guard(DistInfo(rank=0, world_size=2, timeout_s=1800), grace_s=60):
            with faults.training_faults(checkpoint=None, batch_size=4, save_interrupted=full_disk, probe_step=None):
                fail()


def test_the_guard_s_watchdog_does_not_end_rank_0_while_it_saves_the_weights(tmp_path):
    """The watchdog ends a rank blocked in a collective grace_s after another rank's failure is
    recorded; it ended rank 0 with os._exit while rank 0 wrote the weights (a save longer than
    the 2 s grace: a large model, a slow disk), so nothing was saved and nothing said so."""
    import subprocess
    import sys

    code = ("import itertools, pathlib, time, torch\n"
            "import transferkit.train.distributed as distributed\n"
            "import transferkit.train.faults as faults\n"
            "store = torch.distributed.HashStore()\n"
            "distributed._store_for = lambda info: store\n"
            "distributed._generation = itertools.count(3)\n"
            "def save():\n"
            "    time.sleep(1.5)\n"
            f"    return pathlib.Path({str(tmp_path / 'w.pt')!r})\n"
            "try:\n"
            "    with distributed.rank_guard(distributed.DistInfo(rank=0, world_size=2), grace_s=0.3, poll_s=0.05):\n"
            "        with faults.training_faults(checkpoint=None, batch_size=4, save_interrupted=save,\n"
            "                                    probe_step=None):\n"
            "            store.set('transferkit/rank_guard/3/first', 'rank 1 failed: ValueError: boom')\n"
            "            time.sleep(0.2)\n"
            "            raise RuntimeError('[gloo] Read error: Connection reset by peer')\n"
            "except Exception as exc:\n"
            "    print('raised:', exc)\n")
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "raised: Rank 0 stops because rank 1 failed: ValueError: boom" in proc.stdout
    assert f"The current weights were saved to {str(tmp_path / 'w.pt')!r}" in proc.stdout


def test_an_output_error_before_training_keeps_no_weights(image_folder, tmp_path, monkeypatch):
    import transferkit.steps as steps
    from transferkit.errors import OutputError

    def unwritable(*args, **kwargs):
        raise OutputError("The ONNX feature pass path 'x.onnx' cannot be written: permission denied.")
    monkeypatch.setattr(steps, "cached_features", unwritable)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(OutputError) as info:
        tk.finetune("tk:small_cnn", data=image_folder, epochs=2, **{**FAST, "policy": "feature_extraction"})
    assert "weights" not in str(info.value) and list(cwd.iterdir()) == []


def test_rank_0_keeps_the_weights_where_another_rank_was_interrupted_alone(tmp_path, monkeypatch):
    """torchrun, no checkpoint, SIGTERM to rank 1 only: rank 1 said rank 0 saves the weights, and
    rank 0 stopped on its failed collective with nothing saved (13 epochs lost in the pass)."""
    import signal

    import transferkit.train.faults as faults
    from transferkit._signals import interrupt_exit

    record = "rank 1 failed: TrainingInterrupted: Interrupted (SIGTERM). The weights are the same on every rank."
    monkeypatch.setattr(faults, "peer_interruption", lambda: record)
    saved = tmp_path / "m.interrupted.pt"
    with pytest.raises(TrainingInterrupted) as info:
        with faults.training_faults(checkpoint=None, batch_size=4, save_interrupted=lambda: saved, probe_step=None):
            raise RuntimeError("[gloo] Read error: Connection reset by peer")  # the collective rank 1 left
    assert info.value.checkpoint == saved
    assert str(info.value).startswith(f"Interrupted (SIGTERM) on another rank: {record[:-1]}. The current weights "
                                      f"were saved to {str(saved)!r}")
    assert interrupt_exit(info.value, str(info.value))[1] == 143 and info.value.signum == signal.SIGTERM
    monkeypatch.setattr(faults, "peer_interruption", lambda: None)  # a failure of this rank's own: as it is
    with pytest.raises(RuntimeError, match="Connection reset"):
        with faults.training_faults(checkpoint=None, batch_size=4, save_interrupted=lambda: saved, probe_step=None):
            raise RuntimeError("[gloo] Read error: Connection reset by peer")


@pytest.mark.parametrize("text, is_oom", [
    ("CUDA out of memory. Tried to allocate 2.00 GiB", True),
    ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 17179869184 bytes", True),
    ("DefaultCPUAllocator: not enough memory: you tried to allocate 5", True),  # Windows
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
    ("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer", True),
    ("NCCL error in: ProcessGroupNCCL.cpp:1\nLast error:\nCuda failure 'out of memory'", True),  # its last line
    ("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback:\nRuntimeError: CUDA out of memory.",
     True),
    ("The following operation failed in the TorchScript interpreter.\n  File /srv/bad_alloc/model.py, line 3\n"
     "RuntimeError: Input type (unsigned char) and bias type (float) should be the same", False),  # a path's word
])
def test_out_of_memory_is_read_from_the_error_s_own_lines(text, is_oom):
    """One test of running out of memory serves training's batch-size hint, the predictor and
    the engines; the predictor's read "alloc" anywhere (a path realloc/ too), training's missed
    torch's CPU allocator, cuBLAS and Windows."""
    from transferkit.hardware import out_of_memory

    assert out_of_memory(RuntimeError(text)) is is_oom

