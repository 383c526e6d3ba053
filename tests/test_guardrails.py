"""Guard rails: nothing a user or the machine does corrupts a run. A run started again without
--auto_resume, a second trainer in the same folder, a full disk, a damaged shard, a crash in
evaluation: each is refused or stopped with one clear line, and every older file stays whole."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import checkpoint
import train_gpt2
from conftest import REPO_ROOT, load_script, read_metrics, run_main
from shards import shard_path, write_shard

# One layer, 64 wide, one thread: steps and saves of well under a second, bit-identical losses.
ARGS = ["--model", "d2", "--n_layer", "1", "--n_embd", "64", "--n_head", "2", "--block_size", "32", "--seq_len", "16",
        "--micro_batch_size", "2", "--total_batch_size", "64", "--warmup_steps", "2", "--max_lr", "1e-3",
        "--eval_interval", "3", "--eval_steps", "1", "--max_new_tokens", "2", "--num_samples", "1",
        "--num_threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(random_data):
    return random_data


def train(data, log_dir, *extra):
    """train_gpt2.main in this process: its exit status, 0 when it returns."""
    return run_main(train_gpt2.main, ARGS + ["--data_root", data, "--log_dir", log_dir, *extra])


def snapshot(folder):
    """{relative path: bytes} of every file under folder, symlinks as their targets."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def losses(log_dir):
    return {r["step"]: r["loss"] for r in read_metrics(log_dir) if "loss" in r}


def test_a_run_started_again_without_resuming_is_refused_and_every_file_stays_byte_identical(data, tmp_path, capsys):
    log_dir = tmp_path / "log"
    assert train(data, log_dir, "--max_steps", 8, "--checkpoint_interval", 2, "--keep_last_n_checkpoints", 2) == 0
    before = snapshot(log_dir)
    capsys.readouterr()
    assert train(data, log_dir, "--max_steps", 4) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{log_dir} already holds a run (newest: model_00007.pt)" in err
    assert "--auto_resume" in err and "--start_over" in err and "another --log_dir" in err
    assert snapshot(log_dir) == before
    # --start_over moves the old run aside, whole, and trains from step 0.
    assert train(data, log_dir, "--max_steps", 4, "--start_over") == 0
    aside = [p for p in log_dir.iterdir() if p.name.startswith("replaced_")]
    assert len(aside) == 1 and "is now in" in capsys.readouterr().out
    moved = snapshot(aside[0])
    assert {k: v for k, v in before.items() if k != ".train.lock"} == moved
    assert sorted(losses(log_dir)) == [0, 1, 2, 3]


def test_best_model_keeps_the_best_the_folder_has_seen(data, tmp_path):
    log_dir = tmp_path / "log"
    assert train(data, log_dir, "--max_steps", 9, "--checkpoint_interval", 3) == 0
    best = checkpoint.load_checkpoint(log_dir / checkpoint.BEST_NAME)
    # Back to step 3 of the same folder: its validation losses are worse than the best, which must stay.
    assert train(data, log_dir, "--max_steps", 7, "--resume_from_checkpoint", log_dir / "model_00003.pt") == 0
    again = checkpoint.load_checkpoint(log_dir / checkpoint.BEST_NAME)
    assert again["train_state"] == best["train_state"]


def test_a_second_trainer_is_refused_at_once_and_kill_9_frees_the_folder(data, tmp_path, capsys):
    log_dir = tmp_path / "log"
    command = [sys.executable, str(REPO_ROOT / "train_gpt2.py"), *ARGS, "--data_root", str(data), "--log_dir", str(log_dir),
               "--checkpoint_interval", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(command + ["--max_steps", "400"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (log_dir / "model_00002.pt").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read().decode()
        time.sleep(0.05)
    t0 = time.monotonic()
    second = subprocess.run(command + ["--max_steps", "400", "--auto_resume"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    assert second.returncode == 1 and second.stdout == ""
    assert f"is in use by another trainer (pid {first.pid} on " in second.stderr and "running since" in second.stderr
    assert "Stop that one, wait for it to finish, or use another --log_dir" in second.stderr
    assert time.monotonic() - t0 < 30  # at once: before any data, model or probe
    first.kill()  # kill -9: no clean-up runs, the operating system releases the lock
    first.wait()
    steps = [r["step"] for r in read_metrics(log_dir) if "loss" in r]
    assert steps == sorted(set(steps))  # one trainer's log: no step written twice
    assert train(data, log_dir, "--max_steps", max(steps) + 3, "--checkpoint_interval", 2, "--auto_resume") == 0
    assert "auto-resume: " in capsys.readouterr().out


@pytest.fixture
def tiny_disk(tmp_path):
    """A 100 MiB tmpfs: a real full disk, where this test may mount one (root, Linux)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the ENOSPC path is tested in test_checkpoint")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("mode", [[], ["--async_checkpoint"]])
def test_a_full_disk_stops_the_run_with_one_line_and_older_checkpoints_verify(data, tiny_disk, capsys, mode):
    log_dir = tiny_disk / "log"
    # A checkpoint of this model with AdamW's moments is ~39 MB: two fit on the disk, the third cannot.
    status = train(data, log_dir, "--max_steps", 20, "--checkpoint_interval", 1, "--eval_interval", 0, *mode)
    out, err = capsys.readouterr()
    assert status == 1
    assert "warning: " in out and "this run's checkpoints need about" in out  # said before the first save
    assert err.startswith("error: could not write ") and err.count("\n") == 1, err
    for text in ("the disk is full (it needs about", "is free on that filesystem", "the partial file was removed",
                 "--keep_last_n_checkpoints", "--save_optimizer latest", "Older checkpoints are untouched"):
        assert text in err, err
    assert not [p.name for p in log_dir.iterdir() if ".tmp" in p.name]
    saved = checkpoint.list_checkpoints(log_dir)
    assert saved and all(checkpoint.verify_file(p) for _, p in saved)
    assert checkpoint.read_latest(log_dir) == saved[-1][1].resolve()


def test_bench_checkpoint_runs_through_to_its_table(tmp_path, capsys):
    bench = load_script("bench_checkpoint.py")
    assert run_main(bench.main, ["--model", "d2", "--device", "cpu", "--saves", "1", "--dir", tmp_path / "ckpt"]) == 0
    out = capsys.readouterr().out
    assert "resume (CRC check + load + copy)" in out and "checkpoint size (weights + optimizer)" in out


def test_bench_checkpoint_checks_the_space_first_and_leaves_nothing_behind(tiny_disk, monkeypatch, capsys):
    monkeypatch.setenv("TMPDIR", str(tiny_disk))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    bench = load_script("bench_checkpoint.py")
    assert run_main(bench.main, ["--model", "gpt2-xl", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "gpt2-xl needs about" in err and "free" in err and "--saves 1" in err
    assert list(tiny_disk.iterdir()) == []  # its temp folder is gone after the refusal


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-1000]), "is cut short: its header says 20,000 tokens"),
    (lambda p: p.write_bytes(os.urandom(5000)), "is not a readable .npy file"),
    (lambda p: np.save(p, np.full(20_000, 60_000, np.uint16)), "holds token id 60,000 at token 0"),  # was an IndexError
])
def test_a_damaged_shard_is_one_line_naming_the_file_and_the_fix(data, tmp_path, capsys, damage, message):
    broken = tmp_path / "data"
    broken.mkdir()
    for split in ("train", "val"):
        path = shard_path(data, "tiny", split, 0)
        (broken / path.name).write_bytes(path.read_bytes())
    damage(shard_path(broken, "tiny", "train", 0))
    assert train(broken, tmp_path / "log", "--max_steps", 2) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(shard_path(broken, "tiny", "train", 0)) in err and message in err
    assert "copy it again, or re-create" in err and "python -m scripts.prepare_data" in err and "Traceback" not in err


def test_the_end_of_an_epoch_leaves_a_checkpoint_outside_the_rotation_that_resumes(tmp_path, capsys):
    data = tmp_path / "data"
    rng = np.random.default_rng(1)
    # 9 windows of 32 tokens (+1), then the wrap: 2 windows a step, so the data runs out in steps 4 and 8
    write_shard(shard_path(data, "tiny", "train", 0), rng.integers(0, 50257, 300))
    write_shard(shard_path(data, "tiny", "val", 0), rng.integers(0, 50257, 300))
    log_dir = tmp_path / "log"
    assert train(data, log_dir, "--max_steps", 10, "--checkpoint_interval", 1, "--keep_last_n_checkpoints", 1) == 0
    names = sorted(p.name for _, p in checkpoint.list_checkpoints(log_dir))
    assert names == ["model_00004_epoch1.pt", "model_00008_epoch2.pt", "model_00009.pt"], names
    assert checkpoint.load_checkpoint(log_dir / "model_00004_epoch1.pt")["dataloader"]["epoch"] == 1
    tool = load_script("checkpoint_tool.py")
    capsys.readouterr()
    assert run_main(tool.main, ["list", log_dir]) == 0
    assert "model_00004_epoch1.pt" in capsys.readouterr().out
    again = tmp_path / "again"
    assert train(data, again, "--max_steps", 10, "--checkpoint_interval", 1,
                 "--resume_from_checkpoint", log_dir / "model_00004_epoch1.pt") == 0
    assert losses(again) == {s: v for s, v in losses(log_dir).items() if s >= 5}


def test_an_error_in_evaluation_saves_the_step_first(data, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    assert train(data, reference, "--max_steps", 8, "--checkpoint_interval", 100) == 0
    log_dir = tmp_path / "log"
    real = train_gpt2.evaluate_loss

    def fails_at_step_6(model, loader, steps, spec):
        if max(losses(log_dir)) == 6:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(model, loader, steps, spec)

    monkeypatch.setattr(train_gpt2, "evaluate_loss", fails_at_step_6)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        train(data, log_dir, "--max_steps", 8, "--checkpoint_interval", 100)
    assert "saved " + str(checkpoint.step_path(log_dir, 6)) + " before reporting the error" in capsys.readouterr().out
    checkpoint.verify_file(checkpoint.step_path(log_dir, 6))
    monkeypatch.undo()
    assert train(data, log_dir, "--max_steps", 8, "--checkpoint_interval", 100, "--auto_resume") == 0
    assert losses(log_dir) == losses(reference)  # steps 0-6 from before the error, 7 after: nothing lost or changed


def test_on_a_network_filesystem_a_fresh_heartbeat_of_another_machine_holds_the_folder(tmp_path, monkeypatch, capsys):
    """NFS can grant the kernel's lock on two machines at once; there the lock file's heartbeat
    decides: another machine's run holds the folder until its heartbeat is STALE_AFTER_S old."""
    import files

    monkeypatch.setattr(files, "filesystem_type", lambda path: "nfs4")
    folder = tmp_path / "log"
    folder.mkdir()
    elsewhere = {"host": "other-machine", "pid": 4242, "since": time.time() - 600}
    (folder / files.LOCK_NAME).write_text(json.dumps({**elsewhere, "heartbeat": time.time() - 5}))
    with pytest.raises(files.RunLockError, match="pid 4242 on other-machine.*heartbeat is 5 s old"):
        files.RunLock(folder).acquire()
    (folder / files.LOCK_NAME).write_text(json.dumps({**elsewhere, "heartbeat": time.time() - files.STALE_AFTER_S - 1}))
    capsys.readouterr()
    lock = files.RunLock(folder).acquire()  # a machine gone for longer than that: taken over
    try:
        line = capsys.readouterr().out
        assert "heartbeat lock as well" in line and "network filesystem (nfs4)" in line
        holder = json.loads((folder / files.LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    finally:
        lock.release()
