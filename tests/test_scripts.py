"""The one-command start scripts: help, dry run, flags passed through, the data check, and a real
(tiny) CPU run that resumes."""
import os
import stat
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TINY_RUN

SCRIPTS = ["start_cuda_optimized_training.sh", "start_mps_optimized_training.sh", "start_cpu_training.sh",
           "start_multi_gpu_training.sh"]
DEVICE = {"start_cuda_optimized_training.sh": "cuda", "start_mps_optimized_training.sh": "mps",
          "start_cpu_training.sh": "cpu", "start_multi_gpu_training.sh": "cuda"}


def run_script(name, args=(), cwd=None, timeout=60, **env):
    full_env = {k: v for k, v in os.environ.items() if k not in ("DATA_ROOT", "DRY_RUN", "NPROC_PER_NODE", "NNODES")}
    full_env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **{k: str(v) for k, v in env.items()})
    return subprocess.run([str(REPO_ROOT / "scripts" / name)] + [str(a) for a in args], cwd=cwd or REPO_ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_is_executable_and_strict(name):
    path = REPO_ROOT / "scripts" / name
    assert path.stat().st_mode & stat.S_IXUSR
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text and '"$@"' in text


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name):
    result = run_script(name, ["--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and "DATA_ROOT" in result.stdout and "DRY_RUN" in result.stdout
    assert "+ " not in result.stdout  # nothing run


@pytest.mark.parametrize("name", SCRIPTS)
def test_dry_run_prints_the_command_with_auto_resume_and_the_extra_flags(name, tiny_data):
    result = run_script(name, ["--max_steps", 7, "--log_dir", "my runs"], DRY_RUN=1, DATA_ROOT=tiny_data, NPROC_PER_NODE=2)
    assert result.returncode == 0, result.stderr
    command = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert len(command) == 1, result.stdout
    command = command[0]
    assert "train_gpt2.py" in command and "--auto_resume" in command
    assert f"--device {DEVICE[name]} --preset {DEVICE[name]}" in command
    assert f"--data_root {tiny_data}" in command
    assert command.endswith("--max_steps 7 --log_dir my\\ runs")  # passed through last, so they win
    assert "DRY_RUN=1: not running it" in result.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_missing_data_names_the_prepare_command(name, tmp_path):
    result = run_script(name, DRY_RUN=1, DATA_ROOT=tmp_path / "nothing_here", NPROC_PER_NODE=2)
    assert result.returncode == 1
    assert "no train shards" in result.stderr and "python -m scripts.prepare_data" in result.stderr and "nothing_here" in result.stderr
    assert "+ " not in result.stdout


@pytest.mark.parametrize("files", [["train.bin", "val.bin"], ["fineweb_train_000001.bin", "fineweb_val_000000.bin"]])
def test_the_data_check_takes_nanogpt_and_llmc_token_files(tmp_path, files):
    for name in files:
        (tmp_path / name).write_bytes(b"\0\0" * 100)  # the loader checks their contents; the script their names
    result = run_script("start_cpu_training.sh", DRY_RUN=1, DATA_ROOT=tmp_path)
    assert result.returncode == 0 and f"--data_root {tmp_path}" in result.stdout, result.stderr


@pytest.mark.parametrize("name", ["start_cpu_training.sh", "start_mps_optimized_training.sh"])
def test_without_data_root_the_quickstart_runs_and_prepares_its_own_data(name, tmp_path):
    result = run_script(name, cwd=tmp_path, DRY_RUN=1)  # no data/ here: train_gpt2.py prepares tiny Shakespeare
    assert result.returncode == 0, result.stderr
    assert "train_gpt2.py" in result.stdout and "--data_root" not in result.stdout


def test_multi_gpu_rendezvous_from_the_torchrun_variables(tiny_data):
    single = run_script("start_multi_gpu_training.sh", DRY_RUN=1, DATA_ROOT=tiny_data, NPROC_PER_NODE=8)
    assert "-m torch.distributed.run --standalone --nproc_per_node=8 " in single.stdout
    multi = run_script("start_multi_gpu_training.sh", DRY_RUN=1, DATA_ROOT=tiny_data, NPROC_PER_NODE=4, NNODES=2,
                       NODE_RANK=1, MASTER_ADDR="10.0.0.1", MASTER_PORT=29600)
    assert ("--nnodes=2 --node_rank=1 --master_addr=10.0.0.1 --master_port=29600 --nproc_per_node=4 "
            in multi.stdout), multi.stdout
    missing = run_script("start_multi_gpu_training.sh", DRY_RUN=1, DATA_ROOT=tiny_data, NPROC_PER_NODE=4, NNODES=2)
    assert missing.returncode == 1 and "NODE_RANK" in missing.stderr and "MASTER_ADDR" in missing.stderr
    bad = run_script("start_multi_gpu_training.sh", DRY_RUN=1, DATA_ROOT=tiny_data, NPROC_PER_NODE="x")
    assert bad.returncode == 1 and "not a positive number" in bad.stderr


def test_multi_gpu_restarts_by_default_and_passes_torchrun_options_through(tiny_data):
    single = run_script("start_multi_gpu_training.sh", ["--monitor-interval=1", "--", "--max_steps", 7], DRY_RUN=1,
                        DATA_ROOT=tiny_data, NPROC_PER_NODE=8)
    assert "--standalone --nproc_per_node=8 --max-restarts=3 --monitor-interval=1 " in single.stdout, single.stdout
    assert single.stdout.splitlines()[0].endswith("--auto_resume --max_steps 7")  # the rest is train_gpt2.py's
    c10d = run_script("start_multi_gpu_training.sh", DRY_RUN=1, DATA_ROOT=tiny_data, NPROC_PER_NODE=4, NNODES=2,
                      RDZV_ENDPOINT="10.0.0.1:29400", RDZV_ID="run7", MAX_RESTARTS=0)
    assert ("--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=10.0.0.1:29400 --rdzv-id=run7 --nproc_per_node=4 "
            "--max-restarts=0 " in c10d.stdout), c10d.stdout
    bad = run_script("start_multi_gpu_training.sh", DRY_RUN=1, DATA_ROOT=tiny_data, NPROC_PER_NODE=4, MAX_RESTARTS="-1")
    assert bad.returncode == 1 and "MAX_RESTARTS" in bad.stderr


def test_slurm_script_runs_one_torchrun_per_node_meeting_on_the_first_node(tiny_data, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu-07\\ngpu-08\\n"\n')
    (fake / "srun").write_text('#!/bin/sh\necho "srun $*" >&2\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n')
    for tool in fake.iterdir():
        tool.chmod(0o755)
    result = run_script("slurm_train.sbatch", ["--max_steps", 5], DRY_RUN=1, DATA_ROOT=tiny_data, NPROC_PER_NODE=8,
                        PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-[07-08]",
                        SLURM_JOB_NUM_NODES=2, SLURM_JOB_ID=4242, SLURM_SUBMIT_DIR=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert "srun --ntasks-per-node=1 --kill-on-bad-exit=1 " in result.stderr
    command = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert len(command) == 1, result.stdout
    assert ("--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=gpu-07:29500 --rdzv-id=4242 --nproc_per_node=8 "
            "--max-restarts=3 " in command[0]), command
    assert command[0].endswith("--auto_resume --max_steps 5")


def test_multi_gpu_starts_one_process_per_gpu_torch_sees(tiny_data, tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\necho 3\n')  # torch.cuda.device_count() on a 3-GPU machine
    fake_python.chmod(0o755)
    three = run_script("start_multi_gpu_training.sh", DRY_RUN=1, DATA_ROOT=tiny_data, PYTHON=fake_python)
    assert "--nproc_per_node=3 " in three.stdout and "NPROC_PER_NODE=3: GPUs torch sees" in three.stdout
    none = run_script("start_multi_gpu_training.sh", DRY_RUN=1, DATA_ROOT=tiny_data, CUDA_VISIBLE_DEVICES="")
    assert none.returncode == 1 and "torch sees no GPU" in none.stderr and "NPROC_PER_NODE" in none.stderr


def test_cpu_script_trains_and_resumes(tiny_data, tmp_path):
    flags = [a for a in TINY_RUN if a not in ("--device", "cpu")] + ["--log_dir", tmp_path / "log", "--total_batch_size", 128,
                                                                     "--eval_interval", 2, "--checkpoint_interval", 2]
    first = run_script("start_cpu_training.sh", flags + ["--max_steps", 2], cwd=tmp_path, timeout=300, DATA_ROOT=tiny_data)
    assert first.returncode == 0, first.stderr
    assert "preset:cpu" in first.stdout and "step     1" in first.stdout
    second = run_script("start_cpu_training.sh", flags + ["--max_steps", 4], cwd=tmp_path, timeout=300, DATA_ROOT=tiny_data)
    assert second.returncode == 0, second.stderr
    assert "step     0 " not in second.stdout and "step     3" in second.stdout  # resumed at step 2


BENCH = ["--model", "d2", "--micro_batch_size", 2, "--seq_len", 32, "--device", "cpu", "--warmup", 1, "--steps", 2]


def bench_rows(stdout):
    """The table's rows, split into columns, and the header once."""
    lines = stdout.splitlines()
    headers = [line for line in lines if line.startswith("model ")]
    return headers, [line.split() for line in lines if line.startswith("d2 ")]


def test_benchmark_times_the_training_step_on_real_shards(tiny_data):
    result = subprocess.run([sys.executable, "-m", "scripts.benchmark"] + [str(a) for a in BENCH]
                            + ["--data_root", str(tiny_data)], capture_output=True, text=True, timeout=300,
                            cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    headers, rows = bench_rows(result.stdout)
    assert len(headers) == 1 and len(rows) == 1, result.stdout
    ms, tok_s, loss = float(rows[0][7]), float(rows[0][9].replace(",", "")), float(rows[0][13])
    assert rows[0][14] == "off"  # --deterministic
    assert tok_s == pytest.approx(2 * 32 / (ms / 1000), rel=0.01)
    assert 9 < loss < 12  # an untrained model's loss over 50k tokens: about ln(50304) = 10.8
    assert "data loader alone:" in result.stdout


def test_benchmark_under_torchrun_runs_ddp_with_each_bucket_setting():
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "scripts.benchmark"] + [str(a) for a in BENCH]
                            + ["--ddp_bucket_cap_mb", "1", "25", "--ddp_bucket_view", "on", "off"],
                            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    headers, rows = bench_rows(result.stdout)
    assert len(headers) == 1 and "tok/s/GPU" in headers[0] and "tok/s all" in headers[0]  # rank 0's table only
    assert [" ".join(row[16:]) for row in rows] == ["ddp 1 MB", "ddp 1 MB, copies", "ddp 25 MB", "ddp 25 MB, copies"]
    for row in rows:
        assert float(row[15].replace(",", "")) == pytest.approx(2 * float(row[9].replace(",", "")), abs=2)
    assert "device: cpu x 2" in result.stdout


def test_attention_benchmark_compares_kernel_families_and_names_the_missing_ones():
    result = subprocess.run([sys.executable, "-m", "scripts.bench_attention", "--batch", "2", "--seq_len", "64",
                             "--device", "cpu", "--repeats", "2", "--families", "math", "flash", "cudnn"],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
    assert float(rows["math"][-1]) == 0  # the reference against itself
    assert float(rows["flash"][-1]) < 1e-5  # PyTorch's CPU flash kernel, fp32: the same attention
    assert float(rows["math"][0]) > 0 and float(rows["math"][2]) > 0
    assert rows["cudnn"][0] == "unavailable:"  # no CUDA here: one line says so, the table goes on


def test_benchmark_trains_each_configuration_in_ddp_with_its_bucket_settings(monkeypatch):
    """Under torchrun only rank 0's table is seen, and it reads the same whether or not the step ran
    in DDP; so here, in this process (gloo, world size 1), the model train_step gets is checked."""
    import argparse
    import importlib.util

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import distributed

    spec = importlib.util.spec_from_file_location("benchmark", REPO_ROOT / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    trained, train_step = [], benchmark.train_step
    monkeypatch.setattr(benchmark, "train_step", lambda model, *rest: trained.append(model) or train_step(model, *rest))
    args = argparse.Namespace(seq_len=16, grad_accum_steps=1, data_root=None, warmup=0, steps=2, sdpa_backend="auto",
                              profile=False, activation_checkpointing=False)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        row = benchmark.bench_config(args, "d2", 2, "none", "torch", 0, ("ddp", 7.0, False), torch.device("cpu"), "fp32",
                                     distributed.Dist(True, rank=0, local_rank=0, world_size=1))
    finally:
        dist.destroy_process_group()
    assert len(trained) == 2 and all(isinstance(model, DistributedDataParallel) for model in trained)
    assert trained[0].bucket_bytes_cap == 7 * 2**20 and trained[0].gradient_as_bucket_view is False
    assert row["parallel"] == "ddp 7 MB, copies"


def test_determinism_benchmark_compares_two_runs_and_a_resume(tiny_data, tmp_path, monkeypatch, capsys):
    from conftest import load_script, run_main
    import train_gpt2

    bench = load_script("bench_determinism.py")
    runs = []  # the trainer in this process: the table's logic and the flags it passes are what is tested here
    monkeypatch.setattr(bench, "run_trainer", lambda argv: runs.append(argv) or (run_main(train_gpt2.main, argv), ""))
    tiny = ["--model", "d2", "--n_layer", "1", "--n_embd", "64", "--n_head", "2", "--block_size", "32", "--seq_len", "16",
            "--micro_batch_size", "2", "--total_batch_size", "64", "--device", "cpu", "--num_threads", "1"]
    assert run_main(bench.main, ["--data_root", tiny_data, "--compile", "none", "--deterministic", "on", "--steps", "4",
                                 "--resume_at", "1", "--dir", tmp_path, "--", *tiny]) == 0
    assert [("--deterministic" in argv, "--resume_from_checkpoint" in argv) for argv in runs] == \
        [(True, False), (True, False), (True, True)]
    header, row = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("compile", "none"))]
    assert "2 runs: equal of 4" in header and "resume: equal of 2" in header
    assert row.split()[:6] == ["none", "on", "4", "0.00e+00", "2", "0.00e+00"]  # the CPU repeats itself bit for bit
