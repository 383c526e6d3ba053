"""Beyond one process, on the CPU with gloo: machines that do not share a disk, FSDP giving one
process's losses, and checkpoints moving between one process, DDP and FSDP."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import checkpoint
import train_gpt2
from conftest import REPO_ROOT, read_metrics, run_main, run_ranks

# 128 tokens a step: 2 micro batches of 2 x 16 in one process, one per rank on two ranks.
ARGS = ["--model", "d2", "--n_layer", "2", "--n_embd", "64", "--n_head", "2", "--block_size", "32", "--seq_len", "16",
        "--micro_batch_size", "2", "--total_batch_size", "128", "--warmup_steps", "2", "--max_lr", "1e-3",
        "--eval_interval", "3", "--eval_steps", "1", "--max_new_tokens", "2", "--num_samples", "1",
        "--num_threads", "1", "--device", "cpu", "--max_steps", "8"]
TOLERANCE = 1e-4  # two ranks sum their gradients in another order than one process accumulating them


@pytest.fixture(scope="module")
def data(random_data):
    return random_data


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One process, uninterrupted: {(step, "loss" | "val_loss"): value} and its log dir."""
    log_dir = tmp_path_factory.mktemp("reference")
    assert run_main(train_gpt2.main, ARGS + ["--data_root", data, "--log_dir", log_dir, "--checkpoint_interval", 2]) == 0
    return logged(log_dir), log_dir


def logged(log_dir):
    """{(step, key): value}, the later line winning where a resumed run logged a step again."""
    return {(r["step"], key): r[key] for r in read_metrics(log_dir) for key in ("loss", "val_loss") if key in r}


def assert_close(got, want, first_step=0):
    want = {k: v for k, v in want.items() if k[0] >= first_step}
    assert sorted(got) == sorted(want)
    assert all(abs(got[k] - want[k]) < TOLERANCE for k in want), [(k, got[k], want[k]) for k in want]


def torchrun(*args, nproc=2, cwd=None, **launch):
    """train_gpt2.py under torchrun on this machine, gloo ranks."""
    rendezvous = [f"--{k}={v}" for k, v in launch.items()] or ["--standalone"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={nproc}",
                           str(REPO_ROOT / "train_gpt2.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.slow
def test_fsdp_gives_one_process_losses_and_checkpoints_move_between_fsdp_ddp_and_one_process(data, reference, tmp_path):
    expected, reference_dir = reference
    fsdp = tmp_path / "fsdp"
    # HellaSwag with one example: rank 1 scores none, and must still run the forward passes rank 0 runs.
    run = torchrun(*ARGS, "--data_root", data, "--log_dir", fsdp, "--checkpoint_interval", 2, "--fsdp",
                   "--hellaswag_interval", 4, "--hellaswag_limit", 1,
                   "--hellaswag_file", REPO_ROOT / "tests" / "fixtures" / "hellaswag_tiny.jsonl")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fsdp: weights, gradients and AdamW state sharded over 2 rank(s)" in run.stdout
    assert_close(logged(fsdp), expected)
    assert [r["hellaswag_n"] for r in read_metrics(fsdp) if "hellaswag_n" in r] == [1, 1, 1]
    assert checkpoint.load_checkpoint(fsdp / "model_00004.pt")["model"]["transformer.wte.weight"].shape == (50304, 64)

    one = tmp_path / "one"  # FSDP's checkpoint in one process
    assert run_main(train_gpt2.main, ARGS + ["--data_root", data, "--log_dir", one,
                                             "--resume_from_checkpoint", fsdp / "model_00004.pt"]) == 0
    assert_close(logged(one), expected, first_step=5)
    ddp = tmp_path / "ddp"  # FSDP's checkpoint under DDP, which writes its own
    run = torchrun(*ARGS, "--data_root", data, "--log_dir", ddp, "--checkpoint_interval", 2,
                   "--resume_from_checkpoint", fsdp / "model_00002.pt")
    assert run.returncode == 0, run.stderr[-3000:]
    assert_close(logged(ddp), expected, first_step=3)
    back = tmp_path / "back"  # DDP's checkpoint under FSDP, saving in the background
    run = torchrun(*ARGS, "--data_root", data, "--log_dir", back, "--fsdp", "--async_checkpoint",
                   "--resume_from_checkpoint", ddp / "model_00004.pt")
    assert run.returncode == 0, run.stderr[-3000:]
    assert_close(logged(back), expected, first_step=5)
    final = checkpoint.load_checkpoint(back / "model_00007.pt")
    assert final["dataloader"] == checkpoint.load_checkpoint(reference_dir / "model_00007.pt")["dataloader"]
    checkpoint.verify_file(back / "model_00007.pt")


def test_fsdp_ranks_each_hold_half_of_the_weights_gradients_and_adamw_state(tmp_path):
    result = run_ranks("fsdp_memory.py", "d2", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    whole = ranks[0]["whole"]
    for held in ranks:
        for part, whole_bytes in (("weights", whole), ("gradients", whole), ("adamw", 2 * whole)):
            assert 0.49 * whole_bytes < held[part] < 0.51 * whole_bytes, (part, held, whole)
    assert ranks[0]["weights"] + ranks[1]["weights"] >= whole  # all of it, once (rows padded to an even split)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_machines(data, folders, *extra):
    """Two torchrun "machines" of one rank each, the first in folders[0]: each sees its own --log_dir
    (the same relative path, another folder), as machines without a shared disk do."""
    port = free_port()
    return [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}", "--master_addr=127.0.0.1",
         f"--master_port={port}", "--nproc_per_node=1", str(REPO_ROOT / "train_gpt2.py"), *ARGS, "--data_root", str(data),
         "--log_dir", "log", "--checkpoint_interval", "2", *map(str, extra)],
        cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        for rank, folder in enumerate(folders)]


def worker_of(agent):
    """The training process torchrun started (its child)."""
    children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = children.read_text().split() if children.exists() else []
        if pids:
            return int(pids[0])
        time.sleep(0.05)
    pytest.fail("torchrun started no worker")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's worker through /proc (Linux)")
def test_two_machines_without_a_shared_disk_stop_and_resume_with_the_uninterrupted_losses(data, reference, tmp_path):
    expected, _ = reference
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    machines = two_machines(data, (first, second))
    metrics = first / "log" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and any('"step": 3' in line for line in metrics.read_text().splitlines())):
        assert all(m.poll() is None for m in machines) and time.monotonic() < deadline, machines[0].stdout.read()
        time.sleep(0.05)
    os.kill(worker_of(machines[0]), signal.SIGTERM)  # the first machine is pre-empted: both stop, rank 0 saves
    outputs = [m.communicate(timeout=120)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs
    stopped = checkpoint.read_latest(first / "log")
    assert stopped is not None and not list((second / "log").glob("model_*.pt"))  # rank 0 saved on its machine only

    # The machines swapped: rank 0 on the one without checkpoints would start the run over. Refused.
    swapped = two_machines(data, (second, first), "--auto_resume")
    outputs = [m.communicate(timeout=120)[0] for m in swapped]
    assert all(m.returncode != 0 for m in swapped)
    assert "which has no checkpoint in log, but model_" in outputs[0] and "node rank 0" in outputs[0], outputs[0]

    resumed = two_machines(data, (first, second), "--auto_resume")  # rank 1's folder is still empty
    outputs = [m.communicate(timeout=120)[0] for m in resumed]
    assert [m.returncode for m in resumed] == [0, 0], outputs
    assert "resumed from " in outputs[0] and stopped.name in outputs[0]
    assert_close(logged(first / "log"), expected)


@pytest.mark.parametrize("kind, line, status", [
    ("oserror", "RankZeroError: error: rank 0 failed: FileNotFoundError: [Errno 2] No such file or directory: "
                "'/nonexistent-folder/checkpoint.pt'", 1),
    ("runtimeerror", "RankZeroError: error: rank 0 failed: RuntimeError: pinned allocation failed", 1),
    ("usererror", "UsageError: error: --max_steps 0 cannot work: use at least 1", 2)])
def test_an_error_on_rank_0_inside_a_decision_stops_every_rank_at_once_with_one_line(kind, line, status):
    """Rank 0 decides for all (distributed.on_rank0); any exception there, not only a UserError, reaches every
    rank at once: none waits in the next collective for gloo's 30-minute timeout."""
    result = run_ranks("on_rank0.py", kind, timeout=90)  # a rank left waiting would wait 30 minutes
    lines = sorted(text for text in result.stderr.splitlines() if text.startswith("rank "))
    assert lines == [f"rank 0: {line}", f"rank 1: {line}"], result.stderr[-2000:]
    assert f"exitcode  : {status}" in result.stderr and result.returncode != 0
