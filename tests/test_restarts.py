"""Unattended recovery under torchrun on two gloo ranks: a rank killed with kill -9, or stopped with
SIGSTOP (found by the hang watchdog), is restarted by torchrun's elastic agent (--max-restarts); the
new attempt forms its process group and resumes from the newest checkpoint, and the run's losses are
bit-identical to an uninterrupted two-rank run's. The survivor of a dead peer says so in one line."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import checkpoint
import train_gpt2
import watchdog
from conftest import TINY_RUN

REPO = Path(__file__).resolve().parent.parent
MAX_STEPS = 16
# test_faults.py's tiny run: one layer, 64 wide, one thread (bit-identical losses need the same reductions).
TRAIN_ARGS = ["--model", "d2", "--n_layer", "1", "--n_embd", "64", "--n_head", "2", "--block_size", "32",
              "--seq_len", "16", "--micro_batch_size", "2", "--total_batch_size", "64", "--warmup_steps", "4",
              "--max_lr", "1e-3", "--eval_interval", "5", "--eval_steps", "1", "--checkpoint_interval", "4",
              "--max_new_tokens", "2", "--num_samples", "1", "--num_threads", "1", "--device", "cpu",
              "--max_steps", str(MAX_STEPS)]


def torchrun(data, log_dir, *extra, restarts=0):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={restarts}", str(REPO / "train_gpt2.py"), "--data_root", str(data),
            "--log_dir", str(log_dir), *TRAIN_ARGS, *extra]


def start(cmd, output):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(output, "a") as out:  # a session of its own: a failed test kills torchrun and its workers together
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)


def finish(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the run did not finish by itself within {timeout} s")


def records(log_dir):
    """[((step, 'loss' or 'val_loss'), value)] in the order metrics.jsonl has them."""
    path, out = Path(log_dir) / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by kill -9
        out += [((record["step"], key), record[key]) for key in ("loss", "val_loss") if key in record]
    return out


def logged(log_dir):
    """{(step, key): value}; a step run again after a restart overwrites the first one."""
    return dict(records(log_dir))


def wait_for_step(log_dir, step, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not any(s >= step for s, _ in logged(log_dir)):
        if proc.poll() is not None:
            pytest.fail(f"the run exited with {proc.returncode} before step {step}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for step {step}")
        time.sleep(0.01)


def worker_pid(torchrun_pid, local_rank):
    """The pid of torchrun's worker with this LOCAL_RANK (Linux: read from /proc)."""
    for child in Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={local_rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"torchrun {torchrun_pid} has no worker with LOCAL_RANK={local_rank}")


@pytest.fixture(scope="module")
def reference(random_data, tmp_path_factory):
    """An uninterrupted two-rank run's losses."""
    log_dir = tmp_path_factory.mktemp("reference")
    output = log_dir / "output.txt"
    proc = start(torchrun(random_data, log_dir / "log"), output)
    assert finish(proc, 180) == 0, output.read_text()
    return logged(log_dir / "log")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
def test_kill_9_of_a_rank_is_restarted_by_torchrun_and_resumes_bit_identically(random_data, reference, tmp_path):
    log_dir, output = tmp_path / "log", tmp_path / "output.txt"
    proc = start(torchrun(random_data, log_dir, "--auto_resume", restarts=2), output)
    wait_for_step(log_dir, 6, proc)  # model_00004.pt is written
    os.kill(worker_pid(proc.pid, 1), signal.SIGKILL)
    assert finish(proc, 150) == 0, output.read_text()
    text = output.read_text()
    assert "auto-resume: " in text and "continuing at step" in text, text  # the new attempt resumed
    assert "connectFullMesh failed" not in text, text  # the stale addresses of the dead attempt were not used
    assert re.search(r"^error: rank 1 \(pid \d+ on this machine\) is gone: rank 0's collective in step \d+ \(\w+\) "
                     r"failed with .*; torchrun restarts the group \(restart 1 of 2\)", text, re.M), text
    steps = [step for (step, key), _ in records(log_dir) if key == "loss"]
    assert len(steps) > len(set(steps)), steps  # steps after the checkpoint were run twice
    assert logged(log_dir) == reference  # every step's loss, bit for bit


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
def test_a_stopped_rank_is_found_by_the_hang_watchdog_and_the_group_restarted(random_data, reference, tmp_path):
    # 5 s rather than the 15 of the issue: torchrun itself waits 30 s before it SIGKILLs the stopped rank.
    log_dir, output = tmp_path / "log", tmp_path / "output.txt"
    proc = start(torchrun(random_data, log_dir, "--auto_resume", "--hang_timeout", "5", restarts=2), output)
    wait_for_step(log_dir, 6, proc)
    stopped = worker_pid(proc.pid, 1)
    os.kill(stopped, signal.SIGSTOP)
    try:
        assert finish(proc, 150) == 0, output.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGKILL)
    text = output.read_text()
    assert re.search(rf"^error: rank 0 made no progress for \d+ s in step \d+ \(\w+\); rank 1 \(pid {stopped} on this "
                     r"machine\) is stopped; every thread's stack is in \S+failures/rank0.log; exiting with status 3: "
                     r"torchrun restarts the group \(restart 1 of 2\)", text, re.M), text
    stacks = (log_dir / "failures" / "rank0.log").read_text()
    assert "Thread" in stacks and "in train_run" in stacks, stacks  # the main thread's stack, where it waited
    assert "auto-resume: " in text
    assert logged(log_dir) == reference


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
def test_a_dead_peer_ends_the_survivor_with_one_line_and_its_traceback_in_the_run_folder(random_data, tmp_path):
    log_dir, output = tmp_path / "log", tmp_path / "output.txt"
    proc = start(torchrun(random_data, log_dir), output)  # no restarts: the user resumes
    wait_for_step(log_dir, 2, proc)
    os.kill(worker_pid(proc.pid, 1), signal.SIGKILL)
    assert finish(proc, 90) != 0
    text = output.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert re.match(r"error: rank 1 \(pid \d+ on this machine\) is gone: rank 0's collective in step \d+ \(\w+\) failed "
                    r"with \"[^\"]+\"; resume with --auto_resume .*; details in \S+failures/rank0.log$", errors[0]), errors[0]
    assert "[rank0]:" not in text and "GLHF" not in text, text  # no gloo traceback from the survivor
    assert f"traceback : {errors[0][len('error: '):]}" in text  # torchrun's summary shows the same line
    detail = (log_dir / "failures" / "rank0.log").read_text()
    assert "Traceback (most recent call last)" in detail and "gloo" in detail, detail


def test_checkpoint_every_minutes_saves_by_wall_time(tiny_data, tmp_path):
    # 6 ms: every step takes longer, so each step after the first (which starts the clock) is due.
    train_gpt2.main(TINY_RUN + ["--data_root", str(tiny_data), "--log_dir", str(tmp_path), "--total_batch_size", "128",
                                "--max_steps", "4", "--checkpoint_interval", "0", "--checkpoint_every_minutes", "0.0001"])
    assert [step for step, _ in checkpoint.list_checkpoints(tmp_path)] == [1, 2, 3]


def test_what_happens_next_depends_on_the_restarts_torchrun_has_left(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert watchdog.restart_hint().startswith("torchrun restarts the group (restart 2 of 3)")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")
    assert watchdog.restart_hint().startswith("torchrun's 3 restarts are spent: resume with --auto_resume")
    monkeypatch.delenv("TORCHELASTIC_MAX_RESTARTS")
    assert watchdog.restart_hint().startswith("resume with --auto_resume")
    assert watchdog.collective_timeout(900) == 900 + watchdog.COLLECTIVE_GRACE_S and watchdog.collective_timeout(0) is None
