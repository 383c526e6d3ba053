"""Fault tests: real train_gpt2.py runs, stopped by SIGTERM, kill -9 (also inside a save), a
diverging update, and a torchrun DDP run resumed in one process. Resumed runs must log exactly
the losses of an uninterrupted run: on CPU a resume is bit-identical."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import signals
import train_gpt2
from conftest import TINY_RUN

REPO = Path(__file__).resolve().parent.parent
MAX_STEPS = 24
LAST = MAX_STEPS - 1
# One layer, 64 wide: the 50304-row embedding still dominates, so steps and saves stay short.
# One thread: the same reductions in every run, which bit-identical losses need.
TRAIN_ARGS = ["--model", "d2", "--n_layer", "1", "--n_embd", "64", "--n_head", "2", "--block_size", "32",
              "--seq_len", "16", "--micro_batch_size", "2", "--total_batch_size", "64", "--warmup_steps", "4",
              "--max_lr", "1e-3", "--eval_interval", "5", "--eval_steps", "1", "--checkpoint_interval", "4",
              "--max_new_tokens", "2", "--num_samples", "1", "--num_threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(random_data):
    return random_data


def train_cmd(data, log_dir, *extra):
    return [sys.executable, str(REPO / "train_gpt2.py"), "--data_root", str(data), "--log_dir", str(log_dir),
            *TRAIN_ARGS, "--max_steps", str(MAX_STEPS), *extra]


def run(cmd, timeout=240):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    result.output = result.stdout + result.stderr
    return result


def start(cmd, output_file):
    with open(output_file, "a") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def logged(log_dir):
    """[((step, 'loss' or 'val_loss'), value)] for every line of metrics.jsonl, in order."""
    records = []
    path = Path(log_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by kill -9
        for key in ("loss", "val_loss"):
            if key in record:
                records.append(((record["step"], key), record[key]))
    return records


def wait_for(condition, proc, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run exited with {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def latest_step(log_dir):
    latest = checkpoint.read_latest(log_dir)
    match = latest and checkpoint.CHECKPOINT_PATTERN.match(latest.name)
    return int(match.group(1)) if match else -1


def assert_no_torn_checkpoint(log_dir):
    for _, path in checkpoint.list_checkpoints(log_dir):
        checkpoint.verify_file(path)  # raises CheckpointError on a torn or corrupt file
    latest = checkpoint.read_latest(log_dir)
    assert latest is None or latest.is_file(), f"latest points at missing {latest}"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted run: its metrics and its log dir."""
    log_dir = tmp_path_factory.mktemp("reference")
    result = run(train_cmd(data, log_dir))
    assert result.returncode == 0, result.output
    return dict(logged(log_dir)), log_dir


@pytest.mark.slow
def test_sigterm_saves_exits_cleanly_and_resumes_bit_identically(data, reference, tmp_path):
    log_dir, output = tmp_path / "log", tmp_path / "output.txt"
    proc = start(train_cmd(data, log_dir, "--async_checkpoint"), output)
    wait_for(lambda: any(step >= 2 for (step, _), _ in logged(log_dir)), proc, "step 2")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, output.read_text()
    stopped = re.search(r"stopped by SIGTERM after step (\d+)", output.read_text())
    assert stopped, output.read_text()
    step = int(stopped.group(1))
    assert step < MAX_STEPS - 1 and checkpoint.read_latest(log_dir) == checkpoint.step_path(log_dir, step).resolve()
    checkpoint.verify_file(checkpoint.step_path(log_dir, step))  # the background write finished before exit

    resumed = run(train_cmd(data, log_dir, "--auto_resume"))
    assert resumed.returncode == 0, resumed.output
    assert f"(step {step}): continuing at step {step + 1}" in resumed.output
    assert dict(logged(log_dir)) == reference[0]  # every step's loss, bit for bit


@pytest.mark.slow
def test_kill_9_at_random_instants_and_inside_saves_never_loses_a_valid_checkpoint(data, reference, tmp_path):
    log_dir, output = tmp_path / "log", tmp_path / "output.txt"
    rng = random.Random(3)
    temp_files_left = 0
    for attempt in range(6):
        mode = ["--async_checkpoint"] if attempt % 2 else []  # the background writer is killed too
        cmd = train_cmd(data, log_dir, "--auto_resume", "--checkpoint_interval", "1", "--keep_last_n_checkpoints", "3", *mode)
        target = latest_step(log_dir) + rng.randint(1, 2)  # so that the run gets somewhere between kills
        proc = start(cmd, output)
        wait_for(lambda: latest_step(log_dir) >= target, proc, f"checkpoint {target}")
        if attempt % 3 == 2:  # the instant a save's temp file appears: mid-write, before os.replace
            torn = lambda: any(p.name.startswith(".model_") and p.name.endswith(f".tmp{proc.pid}")  # noqa: E731
                               for p in log_dir.iterdir())
            wait_for(torn, proc, "a checkpoint write to start")
        else:
            time.sleep(rng.uniform(0.0, 0.3))
        assert proc.poll() is None, f"the run finished before kill -9 (attempt {attempt}); make it longer"
        proc.kill()
        proc.wait()
        temp_files_left += sum(".tmp" in p.name for p in log_dir.iterdir())
        assert_no_torn_checkpoint(log_dir)
    assert temp_files_left > 0  # some kill did land inside a write

    assert output.read_text().count("auto-resume: /") == 5, output.read_text()  # resumed, not restarted
    final = run(train_cmd(data, log_dir, "--auto_resume", "--checkpoint_interval", "1", "--keep_last_n_checkpoints", "3"))
    assert final.returncode == 0, final.output
    assert "auto-resume: " in final.output
    expected = reference[0]
    assert all(value == expected[key] for key, value in logged(log_dir)), "a resumed step differs from the uninterrupted run"
    assert dict(logged(log_dir)) == expected
    assert not [p.name for p in log_dir.iterdir() if ".tmp" in p.name]  # stale temp files were cleaned up
    assert len(checkpoint.list_checkpoints(log_dir)) == 3


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(data, tmp_path):
    log_dir = tmp_path / "log"
    first = run(train_cmd(data, log_dir, "--max_steps", "3"))
    assert first.returncode == 0, first.output
    # A learning rate of 1e30 from step 3 on: step 3's update turns the weights to NaN, step 4's loss shows it.
    diverged = run(train_cmd(data, log_dir, "--auto_resume", "--max_lr", "1e30", "--checkpoint_interval", "100"))
    assert diverged.returncode == 1, diverged.output
    assert f"resume: --max_steps {MAX_STEPS}, where the checkpoint's run had 3: the LR schedule is recomputed" \
        in diverged.output
    assert re.search(r"error: loss is (nan|inf) at step 4: stopped without saving. The last healthy checkpoint is "
                     r".*model_00002.pt: lower --max_lr",
                     diverged.output), diverged.output
    assert [p.name for _, p in checkpoint.list_checkpoints(log_dir)] == ["model_00002.pt"]
    assert checkpoint.read_latest(log_dir) == checkpoint.step_path(log_dir, 2).resolve()
    checkpoint.verify_file(checkpoint.step_path(log_dir, 2))


def test_single_process_to_ddp_and_back_continues_the_data_stream(data, reference, tmp_path):
    expected, reference_dir = reference
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    # One process wrote model_00004.pt; two gloo ranks take it to step 8; one process finishes.
    ddp = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *train_cmd(data, ddp_dir, "--resume_from_checkpoint", str(reference_dir / "model_00004.pt"))[1:]],
              timeout=300)
    assert ddp.returncode == 0, ddp.output
    back = run(train_cmd(data, single_dir, "--resume_from_checkpoint", str(ddp_dir / "model_00008.pt")))
    assert back.returncode == 0, back.output

    def loader_state(path):
        return checkpoint.load_checkpoint(path)["dataloader"]

    for step in (8, 12, LAST):  # the same global position after every step: no token repeated or skipped
        assert loader_state(ddp_dir / f"model_{step:05d}.pt") == loader_state(reference_dir / f"model_{step:05d}.pt")
    assert loader_state(single_dir / f"model_{LAST:05d}.pt") == loader_state(reference_dir / f"model_{LAST:05d}.pt")
    assert checkpoint.load_checkpoint(ddp_dir / "model_00008.pt")["world_size"] == 2
    # Two ranks average gradients in another order than one process accumulating them: equal up to
    # rounding. (Validation losses differ by design: --eval_steps counts batches per rank.)
    for log_dir, first in ((ddp_dir, 5), (single_dir, 9)):
        got = {step: value for (step, key), value in logged(log_dir) if key == "loss"}
        want = {step: value for (step, key), value in expected.items() if key == "loss" and step >= first}
        assert sorted(got) == sorted(want)
        assert all(abs(got[s] - want[s]) < 1e-4 for s in want), [(s, got[s], want[s]) for s in want]


def test_training_gives_the_signal_handlers_back(tmp_path, tiny_data, monkeypatch):
    # Left installed, a finished run's handler would swallow the SIGTERM that ends a forked worker
    # (a multiprocessing pool's terminate() then waits forever) and a notebook's Ctrl-C.
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    during, train_step = [], train_gpt2.train_step

    def watched_step(*args, **kwargs):
        during.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))
        return train_step(*args, **kwargs)

    monkeypatch.setattr(train_gpt2, "train_step", watched_step)
    train_gpt2.main(TINY_RUN + ["--data_root", str(tiny_data), "--log_dir", str(tmp_path), "--total_batch_size", "128",
                                "--max_steps", "2"])
    assert len(during) == 2
    for handlers in during:  # installed while the loop runs: a signal there saves a checkpoint
        assert all(getattr(h, "__self__", None).__class__ is signals.GracefulStop for h in handlers), handlers
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with pytest.raises(SystemExit):  # and when the loop ends in an error: a 1e30 LR, a NaN loss at step 1
        train_gpt2.main(TINY_RUN + ["--data_root", str(tiny_data), "--log_dir", str(tmp_path / "nan"),
                                    "--total_batch_size", "128", "--max_steps", "3", "--max_lr", "1e30"])
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_lost_peer_ignores_torchruns_sigterm_from_inside_the_loop_on(tmp_path, monkeypatch):
    """torchrun SIGTERMs the survivors as soon as one rank dies. The survivor's error leaves the loop as PeerLost,
    already ignoring SIGTERM, and the loop's GracefulStop does not put the default (death) back as the error
    passes: else a SIGTERM during the unwinding ended the rank without its one line (seen under load)."""
    import watchdog

    monkeypatch.setattr(watchdog, "is_peer_failure", lambda exc: True)
    monkeypatch.setattr(watchdog.distributed, "peer_processes", lambda: [])
    monkeypatch.setattr(watchdog, "_tell_torchrun", lambda line: None)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(watchdog.PeerLost, match="Connection reset by peer"):
            with signals.GracefulStop(), watchdog.watching(0, tmp_path, 0):
                raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Read error: Connection reset by peer")
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, before)
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: the test goes on
    finally:
        signal.signal(signal.SIGTERM, before)
    with signals.GracefulStop():  # no error: the previous handler comes back as before
        pass
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_peer_failure_is_a_collectives_error_and_never_an_out_of_memory(monkeypatch):
    import watchdog

    monkeypatch.setattr(watchdog.distributed, "active", lambda: True)
    monkeypatch.setattr(watchdog.dist, "get_world_size", lambda: 2)
    assert watchdog.is_peer_failure(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection reset by peer"))
    assert not watchdog.is_peer_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not watchdog.is_peer_failure(RuntimeError("NCCL error: unhandled cuda error (run out of memory)"))
    assert not watchdog.is_peer_failure(ValueError("gloo/ in a message of another kind"))


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); import signals\n"
              "stop = signals.GracefulStop().__enter__(); print('ready', flush=True)\n"
              "while not stop.agreed(): time.sleep(0.01)\n"
              "print('saving', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(REPO)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline() == "saving\n"  # the first Ctrl-C asks for a save, it does not kill
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 130
    assert "second Ctrl-C" in proc.stderr.read()
