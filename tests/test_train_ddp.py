"""DDP through torchrun: 2 CPU processes with gloo (see tests/ddp_worker.py).

Three torchrun jobs: a correct one (shared by most tests), one where rank 1 raises and then
does not exit, and one where rank 1 stalls past a short collective timeout. Each must end
with the right error, ending the lingering rank rather than waiting for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import transferkit as tk
from transferkit.backbones import get_backbone
from transferkit.checkpoints import load_checkpoint

from conftest import make_image_folder
from ddp_worker import device_decoded_features, feature_setup
from shard_helpers import folder_files, gets, serve, write_shards
from transferkit.train.distributed import DistInfo, collective_timeout, gather_rows, rank_guard, rank_seed, rank_seeds
from transferkit.train.features import compute_features
from transferkit.train.loaders import make_loader

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(data: Path, out: Path, mode: str = "train", timeout: float = 240, args: list[str] | None = None,
             **env: str):
    """Run the worker (or ``args``: a command of ``python``) on 2 gloo ranks; return the finished
    process. ``timeout`` only guards against a hang (the worker's stalls last 600 s); no test
    asserts a duration."""
    runner = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **env}
    cmd = [str(runner), "--nproc_per_node=2", "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
           *(args if args is not None else [str(WORKER), str(data), str(out), mode])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=out)  # a rank ended early keeps its weights in ./, here out
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes SIGTERM on to its workers (each in its own session)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun {mode} did not end within {timeout} s:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ddp") / "images", per_class=12, size=28)


def test_the_cli_under_torchrun_prints_one_result(images, tmp_path):
    """Every rank returned the result, and each printed it: stdout held two JSON objects. What
    the data check finds is said once, not once per rank."""
    data = tmp_path / "data"
    shutil.copytree(images, data)
    next(data.rglob("*.png")).write_bytes(b"not an image")  # found by the quick scan, on every rank
    proc = torchrun(images, tmp_path, args=["-m", "transferkit", "finetune", "--data", str(data), "--backbone",
                                            "tk:small_cnn", "--weights", "none", "--image-size", "16", "--epochs",
                                            "1", "--batch-size", "4", "--device", "cpu", "--set", "num_workers=0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best" in json.loads(proc.stdout)  # one object: json.loads refuses a second
    assert proc.stderr.count("Left out 1 bad image file") == 1, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def ddp_run(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    proc = torchrun(images, out)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (out / "stderr.txt").write_text(proc.stderr)
    return images, out


def _load(out: Path, name: str, rank: int) -> dict:
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=True)


@pytest.mark.parametrize("name", ["cached", "gradual"])
def test_both_ranks_end_with_identical_weights(ddp_run, name):
    _, out = ddp_run
    a, b = _load(out, name, 0), _load(out, name, 1)
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    def strip(h):
        return [{k: v for k, v in row.items() if k != "time_s"} for row in h]

    assert strip(a["history"]) == strip(b["history"])  # losses are all-reduced: every rank reports the same


def test_remote_shards_under_ddp_are_fetched_once_for_both_ranks_which_agree(images, tmp_path):
    items = [(f.read_bytes(), f.suffix[1:].lower(), c) for f, c in folder_files(images)]
    write_shards(items, tmp_path / "s", [9, 0, 6, 9])
    with serve(tmp_path / "s") as (base, requests):
        proc = torchrun(f"{base}/train-{{000000..000003}}.tar", tmp_path, "remote")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert sorted(gets(requests)) == [f"/train-{k:06d}.tar" for k in range(4)]  # one download for the two ranks
    a, b = _load(tmp_path, "remote", 0), _load(tmp_path, "remote", 1)
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert len(a["history"]) == 2


def test_the_cli_under_torchrun_removes_each_process_s_copies_of_streamed_shards(images, tmp_path):
    """Shards read through a pipe without cache_dir are copied into a temporary folder of each
    process, removed as it exits: a worker ended through exit_cleanly (os._exit) left its copy
    of every shard behind in /tmp."""
    items = [(f.read_bytes(), f.suffix[1:].lower(), c) for f, c in folder_files(images)]
    write_shards(items, tmp_path / "s", [12, 12])
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = torchrun(images, tmp_path, args=["-m", "transferkit", "finetune", "--data",
                                            f"pipe:cat {tmp_path}/s/train-{{000000..000001}}.tar", "--backbone",
                                            "tk:small_cnn", "--weights", "none", "--image-size", "16", "--epochs",
                                            "1", "--batch-size", "4", "--device", "cpu", "--set", "num_workers=0"],
                    TMPDIR=str(temp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best" in json.loads(proc.stdout)
    assert not [p.name for p in temp.iterdir() if p.name.startswith("transferkit-shards-")], list(temp.iterdir())


def test_cached_ddp_matches_single_process_with_the_global_batch(ddp_run):
    """2 ranks x batch 4 = one process with batch 8: each step's two shards are the halves of the
    single-process batch (same permutation), and DDP averages their gradients."""
    data, out = ddp_run
    ddp = _load(out, "cached", 0)["state"]
    single = tk.finetune("tk:small_cnn", weights=None, data=data, image_size=32, device="cpu", num_workers=0, seed=0,
                         verbose=False, policy="feature_extraction", epochs=3, batch_size=8, lr=0.05, optimizer="sgd",
                         restore_best=False)
    for k, v in single.model.state_dict().items():
        assert torch.allclose(v, ddp[k], atol=1e-5), k
    head = [k for k in ddp if k.startswith("head.")]
    init = tk.finetune("tk:small_cnn", weights=None, data=data, image_size=32, device="cpu", num_workers=0, seed=0,
                       verbose=False, policy="feature_extraction", epochs=1, batch_size=8, lr=1e-12,
                       optimizer="sgd").model.state_dict()
    assert any(not torch.allclose(init[k], ddp[k], atol=1e-4) for k in head)  # the head did train


def test_gradual_unfreezing_under_ddp(ddp_run):
    """Policy gradual:every=1 over 3 epochs on blocks stem, stage1, stage2, stage3: stage3 trains from
    epoch 1, stage2 from epoch 2; stem and stage1 never. DDP is rebuilt at each unfreeze."""
    _, out = ddp_run
    final = _load(out, "gradual", 0)["state"]
    torch.manual_seed(0)
    tk.seed_everything(0)
    init = get_backbone("tk:small_cnn", weights=None).trunk.state_dict()
    bb = get_backbone("tk:small_cnn", weights=None)

    def changed(block: str) -> bool:
        names = [n for n, _ in bb.trunk.named_parameters() if bb.block_of(n) == block]
        return any(not torch.equal(init[n], final[f"trunk.{n}"]) for n in names)

    assert changed("stage3") and changed("stage2")
    assert not changed("stage1") and not changed("stem")
    ckpt = tk.train.load_checkpoint(out / "gradual.pt")  # written by rank 0 only, complete
    assert ckpt["complete"] and ckpt["epoch"] == 3


def test_features_are_extracted_in_shards_and_gathered_like_one_process(ddp_run):
    """Each rank extracted half the images (2 augmented views, an odd count: the last shard is
    padded); after the gather both ranks hold the single-process array, in memory and on disk."""
    data, out = ddp_run
    r0, r1 = torch.load(out / "features_rank0.pt"), torch.load(out / "features_rank1.pt")
    assert r0["n"] % 2 == 1
    model, ds = feature_setup(str(data))
    single = compute_features(model, ds, key="k", views=2, batch_size=4, device=torch.device("cpu"), num_workers=0,
                              seed=3)
    assert single.features.shape == tuple(r0["memory"].shape) and single.features.shape[:2] == (2, r0["n"])
    for r in (r0, r1):
        assert torch.allclose(r["memory"], torch.from_numpy(single.features), atol=1e-5)
        assert torch.equal(r["targets"], torch.from_numpy(single.targets))
        assert torch.equal(r["disk"], r["memory"])
        assert not r["disk_reused"] and r["again_reused"]  # written once by rank 0, then read by both
    assert torch.equal(r0["memory"], r1["memory"])
    assert not torch.equal(r0["memory"][0], r0["memory"][1])  # the two views are different augmentations
    assert sorted(p.name for p in (out / "cache").iterdir()) == ["k"]  # one entry, no temporary folder left


def test_device_decoded_features_are_split_by_rank_and_gathered_like_one_process(ddp_run):
    """Each rank decoded its own share of the files with the device loader (an odd count: the
    last shard padded); after the gather both ranks hold the single-process array."""
    data, out = ddp_run
    single = device_decoded_features(str(data), str(out), info=DistInfo())
    assert single["n"] % 2 == 1
    for r in (_load(out, "device_features", 0), _load(out, "device_features", 1)):
        assert r["features"].shape == single["features"].shape
        assert torch.allclose(r["features"], single["features"], atol=1e-5)
        assert torch.equal(r["targets"], single["targets"])


def test_dropout_masks_differ_between_ranks(ddp_run):
    """The global RNG is seeded with rank_seed(seed, rank) before training: the ranks' first dropout
    masks differ, while DDP keeps their weights identical."""
    _, out = ddp_run
    a, b = _load(out, "dropout", 0), _load(out, "dropout", 1)
    both = a["mask"][0] & b["mask"][0]  # units whose input is non-zero on both ranks (after the ReLU)
    dropped_a, dropped_b = a["mask"][1][both], b["mask"][1][both]
    assert both.sum() >= 16 and 0 < dropped_a.float().mean() < 1
    assert not torch.equal(dropped_a, dropped_b)
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k


def test_each_rank_validates_its_share_and_every_rank_gets_the_whole_set(ddp_run):
    """Validation under DDP: each image on one rank only, the outputs gathered in the set's
    order: what one process gets from the whole set."""
    _, out = ddp_run
    a, b = _load(out, "gradual", 0), _load(out, "gradual", 1)
    n, passes = a["n_val"], 2 + 1  # epochs 2 and 3 (the first trains the head on cached features), final metrics
    assert n > 2 and a["validated"] == (n + 1) // 2 * passes and b["validated"] == n // 2 * passes
    for r in (a, b):
        assert r["val_logits"].shape[0] == n
        # bf16 autocast (where the CPU has it) may round a row by one unit otherwise in a batch of another size
        assert torch.allclose(r["val_logits"], r["whole_logits"], atol=1e-2, rtol=1e-2)
        assert torch.equal(r["val_logits"].argmax(1), r["whole_logits"].argmax(1))
        assert abs(r["val_loss"] - r["whole_loss"]) <= 1e-2 * max(1.0, abs(r["whole_loss"]))
    assert torch.equal(a["val_logits"], b["val_logits"])


def test_shares_dealt_round_robin_or_in_blocks_are_gathered_in_the_set_s_order(ddp_run):
    _, out = ddp_run
    for rank in (0, 1):
        gathered = torch.load(out / f"whole_sets_rank{rank}.pt", weights_only=True)
        assert gathered["round_robin"].tolist() == gathered["grouped"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_images_decoded_once_into_cache_dir_are_decoded_by_one_rank_and_read_by_the_other(ddp_run):
    _, out = ddp_run
    first, second = (torch.load(out / f"decoded_rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert first["modes"] == second["modes"] == ["disk", "disk"]
    assert (first["decoded"], second["decoded"]) == (2, 0)  # training and validation parts, by rank 0 alone
    assert first["history"] == second["history"]


def test_a_decode_once_longer_than_the_collective_timeout_is_waited_for(images, tmp_path):
    """Rank 0 decodes for 16 s under a 10 s collective timeout (room for a loaded machine in the
    run's other collectives): rank 1 waits for it, not in a collective (a barrier there ended
    the job with a timeout)."""
    proc = torchrun(images, tmp_path, "slow_decode", TRANSFERKIT_DIST_TIMEOUT="10")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    first, second = (torch.load(tmp_path / f"slow_decode_rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert (first["decoded"], second["decoded"]) == (2, 0) and first["history"] == second["history"]


def test_every_rank_reports_the_files_that_any_rank_found_bad_while_loading(ddp_run):
    """Each rank loads its own share of the training and validation files; the files either
    found bad are in both ranks' reports (rank 0's result and summary list them all), and so is
    a class of which no file loads; no rank's validation metrics count a file that failed."""
    from ddp_worker import BAD_FILES, BAD_VAL_FILES

    _, out = ddp_run
    for rank in (0, 1):
        report = torch.load(out / f"load_failures_rank{rank}.pt", weights_only=True)
        names = sorted(Path(p).parent.name + "/" + Path(p).name for p in report["bad_at_load"])
        assert names == sorted(BAD_FILES), (rank, names)
        assert all(reason for _, reason in report["bad_files"])
        assert report["lost_classes"] == ["zebra"], rank  # no zebra file loads, whichever rank met them
        # each rank validates its share: the failed validation files of both count in no metric on either
        failed = sorted({Path(p).parent.name + "/" + Path(p).name for p in report["val_bad_at_load"]})
        assert failed == sorted(BAD_VAL_FILES), (rank, failed)
        assert report["counted"] == len(report["val_files"]) - len(BAD_VAL_FILES), (rank, report["counted"])
    # said once: by the rank that met it, as it met it (the rank that learnt of it said it again), and a class of
    # which no file loads by rank 0
    stderr = (out / "stderr.txt").read_text()
    said = [line for line in stderr.splitlines() if "failed to load during the run" in line]
    for name in BAD_FILES:
        assert sum(name.replace("/", os.sep) in line for line in said) == 1, (name, said)
    assert stderr.count("No training file of class 'zebra' loaded") == 1, stderr[-3000:]


def test_one_rank_failing_ends_every_rank_with_its_error(images, tmp_path):
    """Rank 1 raises in a callback after epoch 1 and then lingers instead of exiting; rank 0, blocked
    in the next epoch's gradient all-reduce, ends by itself with rank 1's error (the collective
    timeout is 300 s, so it is not what ends it)."""
    proc = torchrun(images, tmp_path, "fail", timeout=240, TRANSFERKIT_DIST_TIMEOUT="300")  # lingers 600 s
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 0 stops because rank 1 failed: ValueError: boom from rank 1" in output, output[-3000:]
    assert "rank 1 lingered to its end" not in output  # the job ended rank 1; it did not wait for it


@pytest.mark.parametrize("mode, said", [
    ("other_data", "Rank 0 stops because rank 1 failed: DataError: Rank 1 reads other data than rank 0: train items "
                   "20 on rank 0, 19 here; the file listing (paths, labels, sizes) differs."),
    ("bad_export", "Rank 1 stops because rank 0 failed: OutputError: "),
    ("other_settings", "Rank 0 stops because rank 1 failed: ConfigError: Rank 1 was started with other settings "
                       "than rank 0: batch_size: 4 on rank 0, 2 here."),
])
def test_a_rank_that_refuses_before_training_ends_the_job_with_its_error(images, tmp_path, mode, said):
    """Rank 1 reads a copy of the data with one image less (the ranks would split different
    lists), or rank 0 finds that the export path is a folder; the failed rank then lingers
    instead of exiting, and the other ends by itself with its error."""
    other = tmp_path / "other"
    shutil.copytree(images, other)
    next(other.rglob("*.png")).unlink()
    proc = torchrun(images, tmp_path, mode, timeout=240, TRANSFERKIT_DIST_TIMEOUT="300", RANK1_DATA=str(other))
    output = proc.stdout + proc.stderr
    # "Rank 0 stops ..." when its code raises, "transferkit: rank 0 stops ..." when it waited in a collective
    assert proc.returncode != 0 and said.lower() in output.lower(), output[-3000:]
    assert "lingered to its end" not in output  # the job ended the failed rank; it did not wait for it


def test_a_rank_that_fails_and_exits_while_the_other_waits_at_a_barrier_is_named(images, tmp_path):
    """The waiting rank said "the ranks did not all reach a barrier within 1800 s" (and to raise
    the timeout) seconds after rank 0 had failed writing its outputs and exited."""
    proc = torchrun(images, tmp_path, "export_fails_late", timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Rank 1 stops because rank 0 failed: OSError: the disk went away" in output, \
        output[-3000:]
    assert "within 1800 s" not in output and "raise the timeout" not in output, output[-3000:]


@pytest.mark.parametrize("leaves", [0, 1])
def test_a_barrier_says_a_rank_left_rather_than_a_timeout(images, tmp_path, leaves):
    """gloo words a rank that exited like one that came late ("Ranks 1 failed to pass
    monitoredBarrier"): the waiting rank told the user to raise a 300 s timeout a second in."""
    script = tmp_path / "leave.py"
    script.write_text(
        "import os, time, torch\n"
        "from transferkit.train.distributed import barrier, init_distributed\n"
        "info, _ = init_distributed(torch.device('cpu'))\n"
        f"if info.rank == {leaves}:\n"  # ends without an error: torchrun ends no rank itself
        "    time.sleep(1)\n"
        "    os._exit(0)\n"
        "try:\n"
        "    barrier(info)\n"
        "except Exception as exc:\n"
        "    print(f'rank {info.rank}: {type(exc).__name__}: {exc}', flush=True)\n"
        "os._exit(0)\n")
    proc = torchrun(images, tmp_path, args=[str(script)], timeout=120, TRANSFERKIT_DIST_TIMEOUT="300")
    said = next((line for line in proc.stdout.splitlines() if line.startswith(f"rank {1 - leaves}: ")), "")
    assert "DistributedError: Rank" in said and "another rank failed or ended while this one waited for it" in said, \
        proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "raise the timeout" not in said


def test_a_rank_whose_data_differ_says_what_its_data_check_found(images, tmp_path):
    """Ranks other than 0 keep the data check's warnings to themselves (rank 0 says them), but
    a rank whose data turn out to differ says them: here the file that its copy lacks."""
    other = tmp_path / "other"
    shutil.copytree(images, other)
    damaged = sorted(other.rglob("*.png"))[3]
    damaged.write_bytes(bytes(damaged.stat().st_size))  # the same size, so the listings agree: zeros, not a PNG
    proc = torchrun(images, tmp_path, "other_data", timeout=240, TRANSFERKIT_DIST_TIMEOUT="300", RANK1_DATA=str(other))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "rank 1 reads other data than rank 0: train items" in output.lower(), output[-3000:]
    assert output.count("Left out 1 bad image file") == 1 and damaged.name in output, output[-3000:]


def test_a_rank_refused_before_joining_ends_the_waiting_rank_at_once(images, tmp_path):
    """Rank 0 waits in C++ to join the process group when rank 1's call is refused; torchrun's
    SIGTERM then ends it at once (nothing is trained yet), not torchrun's SIGKILL 30 s later."""
    proc = torchrun(images, tmp_path, "before_joining", timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "epochs=-1 is out of range" in output, output[-3000:]
    assert "Signal 15 (SIGTERM) received by PID" in output and "SIGKILL" not in output, output[-3000:]


def test_sigterm_to_every_rank_saves_the_weights_once(images, tmp_path):
    """A scheduler's SIGTERM reaches every rank; the weights are the same on each, so rank 0
    saves them and the other ranks say so instead of writing copies of their own."""
    proc = torchrun(images, tmp_path, "sigterm", timeout=240)
    output = proc.stdout + proc.stderr
    saved = sorted(p.name for p in tmp_path.glob("*interrupted*"))
    assert saved == ["transferkit-interrupted.pt"], (saved, output[-3000:])
    assert "rank 0: Interrupted (SIGTERM). The current weights were saved to" in proc.stdout, output[-3000:]
    assert "rank 1: Interrupted (SIGTERM). The weights are the same on every rank of the job, so rank 0 saves " \
           "them" in proc.stdout, output[-3000:]
    assert load_checkpoint(tmp_path / "transferkit-interrupted.pt")["model"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the launcher's death is signalled on Linux only")
def test_workers_whose_torchrun_was_killed_end_with_their_weights_kept(images, tmp_path):
    """torchrun killed with SIGKILL (an out-of-memory kill, `kill -9`) left its workers, each in a
    session of its own, training on unseen: they get SIGTERM when it dies and end as a SIGTERM
    ends a run, the checkpoint holding the last completed epoch."""
    runner = Path(sys.executable).with_name("torchrun")
    checkpoint = tmp_path / "run.ckpt"
    cmd = [str(runner), "--nproc_per_node=2", "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
           "-m", "transferkit", "finetune", "--data", str(images), "--backbone", "tk:small_cnn", "--weights", "none",
           "--policy", "full", "--image-size", "16", "--epochs", "100000", "--batch-size", "4", "--precision", "fp32",
           "--checkpoint", str(checkpoint), "--set", "num_workers=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=tmp_path)
    try:
        for _ in range(2400):  # the first epoch's checkpoint (a hang guard: at most 240 s, as the other jobs here)
            if checkpoint.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert checkpoint.exists(), proc.communicate()[1][-3000:]
        proc.kill()  # torchrun alone: its workers are in sessions of their own
        _, stderr = proc.communicate(timeout=240)  # the pipes close when the workers holding them have ended
    finally:
        for pid in filter(str.isdigit, os.listdir("/proc")):  # a worker left running: ended here
            with contextlib.suppress(OSError):
                if str(checkpoint).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(int(pid), signal.SIGKILL)
    assert "Interrupted (SIGTERM). The checkpoint" in stderr, stderr[-3000:]
    # how to continue: the resume refuses another number of processes
    assert f"--checkpoint {checkpoint} --resume` under torchrun with 2 processes in all, as this run was launched " \
           "(--nproc_per_node=2 on one machine)" in stderr, stderr[-3000:]
    assert stderr.count("--resume` under torchrun") == 1 and "rank 0's message says how to continue" in stderr  # once
    saved = load_checkpoint(checkpoint)
    assert saved["epoch"] >= 1 and not saved["complete"]


def test_a_stalled_rank_ends_the_job_after_the_collective_timeout(images, tmp_path):
    """Rank 1 sleeps 600 s in a callback; with TRANSFERKIT_DIST_TIMEOUT=3 rank 0's next collective
    fails after 3 s with an error that says how to raise the limit, and rank 1 is ended too."""
    proc = torchrun(images, tmp_path, "stall", timeout=240, TRANSFERKIT_DIST_TIMEOUT="3")  # sleeps 600 s
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Rank 0: a collective operation waited more than 3 s" in output, output[-3000:]
    assert "TRANSFERKIT_DIST_TIMEOUT=<seconds>" in output
    assert "rank 1 woke from its stall" not in output  # the job ended rank 1; it did not wait for it


def test_rank_seeds_are_distinct_and_rank_0_keeps_the_seed():
    seeds = rank_seeds(5, 8)
    assert seeds[0] == 5 and len(set(seeds)) == 8
    assert rank_seed(5, DistInfo(rank=3, world_size=8)) == rank_seed(5, 3) == seeds[3] == rank_seeds(5, 4)[3]
    assert rank_seeds(6, 2)[1] not in seeds  # no "seed + rank" overlap between runs of neighbouring seeds


def test_augmentation_depends_on_the_item_not_the_rank():
    """The per-item augmentation seed is (seed, epoch, index): two ranks augment their (disjoint)
    items differently, and each rank's item is augmented exactly as in a single-process run."""
    from PIL import Image

    from transferkit.backbones import InputSpec
    from transferkit.data import train_transform

    img = Image.new("RGB", (40, 40))
    img.putdata([(x * 6, y * 6, (x * y) % 256) for y in range(40) for x in range(40)])
    tf = train_transform(InputSpec(image_size=16, resize_size=None), "standard")

    class Same(torch.utils.data.Dataset):  # 8 copies of one image: only the augmentation differs
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return tf(img), 0

    def first_batch(rank: int, world: int) -> torch.Tensor:
        dl = make_loader(Same(), batch_size=8 // world, shuffle=True, device=torch.device("cpu"), num_workers=0,
                         seed=0, rank=rank, world_size=world)
        dl.sampler.set_epoch(1)
        return next(iter(dl))[0]

    r0, r1, single = first_batch(0, 2), first_batch(1, 2), first_batch(0, 1)
    assert not torch.equal(r0, r1)
    assert torch.equal(torch.stack([r0, r1], 1).reshape(single.shape), single)  # the shards interleave


def test_collective_timeout_default_env_and_errors(monkeypatch):
    monkeypatch.delenv("TRANSFERKIT_DIST_TIMEOUT", raising=False)
    assert collective_timeout() == 1800.0 and DistInfo().timeout_s == 1800.0
    monkeypatch.setenv("TRANSFERKIT_DIST_TIMEOUT", "90")
    assert collective_timeout() == 90.0 and collective_timeout(5) == 5.0
    monkeypatch.setenv("TRANSFERKIT_DIST_TIMEOUT", "soon")
    with pytest.raises(tk.ConfigError, match="TRANSFERKIT_DIST_TIMEOUT must be a positive number of seconds, got 'soon'"):
        collective_timeout()
    with pytest.raises(tk.ConfigError, match="timeout must be a positive number"):
        collective_timeout(0)


def test_single_process_helpers_are_plain():
    blocks = list(gather_rows(torch.arange(10).reshape(5, 2), 5, DistInfo()))
    assert len(blocks) == 1 and blocks[0][0] == 0 and blocks[0][1].shape == (5, 2)
    with pytest.raises(KeyError), rank_guard(DistInfo()):  # not distributed: exceptions pass through unchanged
        raise KeyError("x")
    with pytest.raises(tk.TrainingError, match="call init_distributed"), rank_guard(DistInfo(rank=1, world_size=2)):
        pass  # distributed but no process group: an error, not a guard that silently does nothing


def test_copies_of_a_folder_share_their_listing_and_a_renamed_file_does_not(images, tmp_path):
    # what the ranks compare before computing: a copy on each node agrees; the same count with another listing not
    from transferkit.data import ImageFolderDataset
    from transferkit.data.fingerprint import listing_digest

    copy = tmp_path / "copy"
    shutil.copytree(images, copy)
    assert listing_digest(ImageFolderDataset(copy)) == listing_digest(ImageFolderDataset(images))
    first = next(copy.rglob("*.png"))
    first.rename(first.with_name("renamed.png"))
    assert listing_digest(ImageFolderDataset(copy)) != listing_digest(ImageFolderDataset(images))


def test_an_interruption_after_another_rank_failed_names_that_failure(monkeypatch):
    """torchrun sends SIGTERM to the other ranks once one has failed and exited: a rank
    interrupted so says why the job stops (the failed rank's error), not only "Interrupted";
    when every rank was interrupted (a scheduler's SIGTERM), each keeps its own interruption."""
    import itertools

    import transferkit.train.distributed as distributed

    store = torch.distributed.HashStore()
    monkeypatch.setattr(distributed, "_store_for", lambda info: store)
    monkeypatch.setattr(distributed, "_generation", itertools.count(7))
    info = DistInfo(rank=0, world_size=2)

    def interrupted_after(first: str) -> BaseException:
        try:
            with rank_guard(info, grace_s=60):
                store.compare_set(f"transferkit/rank_guard/{next(keys)}/first", "", first)
                raise tk.TrainingInterrupted("Interrupted (SIGTERM). Training had not started.", None)
        except BaseException as exc:  # noqa: BLE001 - a KeyboardInterrupt, caught to be looked at
            return exc
        raise AssertionError("rank_guard swallowed the interruption")
    keys = itertools.count(7)
    said = interrupted_after("rank 1 failed: BadFileError: bad.png")
    assert isinstance(said, distributed.DistributedError) and str(said).startswith(
        "Rank 0 stops because rank 1 failed: BadFileError: bad.png (here: TrainingInterrupted: Interrupted"), said
    assert isinstance(interrupted_after("rank 1 failed: TrainingInterrupted: Interrupted (SIGTERM)."),
                      tk.TrainingInterrupted)
    # a collective that failed because another rank's process went away is not recorded as this rank's
    # failure: a rank interrupted next is not told that this one failed
    with pytest.raises(distributed.DistributedError, match="another rank ended without an error of its own"):
        with rank_guard(info, grace_s=60):
            raise RuntimeError("[gloo/pair.cc:538] Read error [127.0.0.1]:4242: Connection reset by peer")
    assert not store.check([f"transferkit/rank_guard/{next(keys)}/first"])
