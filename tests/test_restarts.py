"""Unattended recovery under torchrun on two gloo ranks: a rank killed with kill -9, or stopped with
SIGSTOP (found by the others' hang watchdog), is restarted by torchrun's elastic agent
(--max-restarts); the new attempt forms its process group and resumes from the newest checkpoint,
with every loss bit-identical to an uninterrupted run's. Also with two torchrun agents ("machines")
meeting through c10d rendezvous, where the agents count their restarts differently. The survivor
of a dead peer says so in one line. And the checkpoint cadence by wall time."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import checkpoint
import train_gpt2
import watchdog
from conftest import TINY_RUN
from scripts import bench_faults

REPO = Path(__file__).resolve().parent.parent
LINUX = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's ranks through /proc (Linux)")
# bench_faults.py's tiny CPU run (one layer, 64 wide, one thread: bit-identical losses need the same reductions).
TRAIN_ARGS = ["--model", "d2", *bench_faults.CPU_MODEL, "--device", "cpu", "--warmup_steps", "2", "--eval_interval", "5",
              "--eval_steps", "1", "--checkpoint_interval", "4", "--num_samples", "1", "--max_new_tokens", "2"]


def start(cmd, output, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
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
    """[(step, loss)] of every step line of metrics.jsonl, in order: a step run again after a restart twice."""
    path, out = Path(log_dir) / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by kill -9
        if "loss" in record:
            out.append((record["step"], record["loss"]))
    return out


def wait_for_step(log_dir, step, procs, timeout=120):
    deadline = time.monotonic() + timeout
    while not any(s >= step for s, _ in records(log_dir)):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"the run ended or stalled before step {step}")
        time.sleep(0.01)


def assert_redone_steps_repeat_their_losses(seen):
    """A step run again after a restart has its first run's loss, bit for bit (no reference run needed)."""
    first = {}
    for step, loss in seen:
        assert first.setdefault(step, loss) == loss, (step, first[step], loss)


@pytest.mark.slow
@LINUX
def test_kill_9_of_a_rank_is_restarted_by_torchrun_with_the_uninterrupted_losses(random_data, tmp_path, capsys):
    # bench_faults.py: an uninterrupted run, then one under --max-restarts with kill -9 of a random
    # rank in step 7 (seed 0), after the step-4 checkpoint.
    status = bench_faults.main(["--nproc", "2", "--kills", "1", "--seed", "0", "--max_steps", "16",
                                "--checkpoint_interval", "4", "--data_root", str(random_data), "--work_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.splitlines()[-1].endswith("losses identical to an uninterrupted run: yes"), out  # bit for bit
    assert re.search(r"^faults, every 4 .* 1 +[\d.]+ +[\d.]+  yes$", out, re.M), out  # recovered, timed
    text = (tmp_path / "faults_4.out").read_text()
    assert "connectFullMesh failed" not in text, text  # the dead attempt's addresses were not used
    assert "auto-resume: " in text and "continuing at step" in text, text  # the new attempt resumed
    assert re.search(r"^error: rank (\d) \(pid \d+ on this machine\) is gone: rank (?!\1)\d's collective in step \d+ "
                     r"\(\w+\) failed with .*; torchrun restarts the group \(restart 1 of 2\)", text, re.M), text


@pytest.mark.slow
@LINUX
def test_a_stopped_rank_is_found_by_the_hang_watchdog_and_the_group_restarted(random_data, tmp_path):
    # --hang_timeout 15, as the issue asks: the watchdog that fires ends the stopped rank itself, which
    # torchrun's SIGTERM cannot reach (its own SIGKILL would come 30 s later).
    log_dir, output = tmp_path / "log", tmp_path / "output.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=2",
           str(REPO / "train_gpt2.py"), *TRAIN_ARGS, "--data_root", str(random_data), "--log_dir", str(log_dir),
           "--max_steps", "12", "--auto_resume", "--hang_timeout", "15"]
    proc = start(cmd, output)
    wait_for_step(log_dir, 6, [proc])
    stopped = bench_faults.workers(proc.pid)[1]
    os.kill(stopped, signal.SIGSTOP)
    try:
        assert finish(proc, 150) == 0, output.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGKILL)
    text = output.read_text()
    assert re.search(rf"^error: rank 0 made no progress for \d+ s in step \d+ \(\w+\); rank 1 \(pid {stopped} on this "
                     r"machine\) is stopped \(ended now: torchrun would wait 30 s before killing a stopped rank 1\); every thread's stack is in \S+failures/rank0.log; exiting with status 3: "
                     r"torchrun restarts the group \(restart 1 of 2\)", text, re.M), text
    stacks = (log_dir / "failures" / "rank0.log").read_text()
    assert "Thread" in stacks and "in train_run" in stacks, stacks  # the main thread's stack, where it waited
    assert "auto-resume: " in text
    seen = records(log_dir)
    assert sorted({step for step, _ in seen}) == list(range(12)) and len(seen) > 12  # finished, with steps redone
    assert_redone_steps_repeat_their_losses(seen)


@LINUX
def test_two_machines_meeting_by_c10d_restart_together_when_rank_0_dies(random_data, tmp_path):
    # Two torchrun agents of one rank each, as two machines run scripts/start_multi_gpu_training.sh.
    # The dead rank's agent counts a restart; the other restarts for the changed membership (not
    # counted) or for its own rank's failure (counted): TORCHELASTIC_RESTART_COUNT may differ between
    # the machines, and the new attempt must form its group either way.
    log_dir = tmp_path / "log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(NNODES="2", RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID="two-machines", NPROC_PER_NODE="1",
               MAX_RESTARTS="2", DATA_ROOT=str(random_data), PYTHON=sys.executable)
    flags = [*TRAIN_ARGS, "--preset", "cpu", "--log_dir", str(log_dir), "--max_steps", "14"]
    agents = [start([str(REPO / "scripts" / "start_multi_gpu_training.sh"), *flags], tmp_path / f"agent{i}.out", env)
              for i in range(2)]
    wait_for_step(log_dir, 6, agents)
    rank0 = [bench_faults.workers(agent.pid).get(0) for agent in agents]
    os.kill(next(pid for pid in rank0 if pid), signal.SIGKILL)
    assert [finish(agent, 150) for agent in agents] == [0, 0], [(tmp_path / f"agent{i}.out").read_text() for i in range(2)]
    seen = records(log_dir)
    assert sorted({step for step, _ in seen}) == list(range(14)) and len(seen) > 14, seen  # finished, steps redone
    assert_redone_steps_repeat_their_losses(seen)


@LINUX
def test_a_dead_peer_ends_the_survivor_with_one_line_and_its_traceback_in_the_run_folder(random_data, tmp_path):
    log_dir, output = tmp_path / "log", tmp_path / "output.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train_gpt2.py"),
           *TRAIN_ARGS, "--data_root", str(random_data), "--log_dir", str(log_dir), "--max_steps", "16"]
    proc = start(cmd, output)  # no --max-restarts: the user resumes
    wait_for_step(log_dir, 2, [proc])
    os.kill(bench_faults.workers(proc.pid)[1], signal.SIGKILL)
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


GIL_HOG = """
import re, sys
sys.path.insert(0, sys.argv[1])
import watchdog
watchdog.BACKSTOP_S = 2
with watchdog.watching(1, sys.argv[2], 0):
    watchdog.progress("train_step", 5)
    re.match(r"(a+)+$", "a" * 40 + "b")  # backtracks for ages in C, holding the GIL: the watchdog thread never runs
"""


def test_a_main_thread_that_holds_the_gil_is_ended_by_faulthandlers_timer(tmp_path):
    result = subprocess.run([sys.executable, "-c", GIL_HOG, str(REPO), str(tmp_path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1, result  # faulthandler's own exit, not the watchdog thread's 3
    assert "Timeout (" in result.stderr and "in match" in result.stderr, result.stderr  # every thread's stack


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
