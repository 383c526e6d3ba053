#!/usr/bin/env python3
"""What checkpoints cost for one model on one device: file size, save time, the training stall
with and without --async_checkpoint, resume time, and the memory a resume adds. Prints a table.

    python -m scripts.bench_checkpoint --model d4 --device cpu                      # < 1 min on a CPU
    python -m scripts.bench_checkpoint --model gpt2 --device cuda --micro_batch_size 16 --seq_len 1024

It trains on random tokens with the real step (train_gpt2.train_step) and the real
CheckpointManager, writing to --dir (default: a temp dir, deleted after). The resume reads a
file written seconds before, so the page cache is warm: a cold read adds size / disk speed.
"""
import contextlib
import io
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__" and not __package__:  # started as a path: say the command that works, exit 2
    from _as_module import exit_with_module_command  # scripts/ is sys.path[0] here; it imports nothing of ours
    exit_with_module_command(__file__)

import environment  # noqa: E402,F401  before torch: it sets variables torch reads when it loads
import numpy as np  # noqa: E402
import torch  # noqa: E402

import checkpoint  # noqa: E402
import checkpoint_manager  # noqa: E402
import cli  # noqa: E402
import dataloader  # noqa: E402
import device as device_mod  # noqa: E402
import files  # noqa: E402
import run_folder  # noqa: E402
import run_state  # noqa: E402
import shards  # noqa: E402
from model import GPT, GPTConfig, MODEL_PRESETS  # noqa: E402
from scripts.benchmark import seconds  # noqa: E402
from train_gpt2 import StepSpec, train_step  # noqa: E402


def host_memory():
    """(current RSS, peak RSS since the last reset) in bytes, from /proc (Linux); None elsewhere."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None, None
    return tuple(int(re.search(rf"{k}:\s+(\d+)", status).group(1)) * 1024 for k in ("VmRSS", "VmHWM"))  # kB there


def reset_host_peak():
    """Make VmHWM start again from the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build(args, device, dtype):
    """A fresh model, its AdamW without state yet, and a grad scaler (on for fp16 only)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL_PRESETS[args.model])).to(device)
    return model, model.configure_optimizer(0.1, 6e-4), torch.amp.GradScaler(device.type, enabled=dtype == "fp16")


def run(argv=None):
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="d2", choices=sorted(MODEL_PRESETS), help="model preset")
    device_mod.add_device_arguments(p)
    p.add_argument("--micro_batch_size", type=int, default=2, help="sequences per training step")
    p.add_argument("--seq_len", type=int, default=32, help="tokens per sequence")
    p.add_argument("--saves", type=int, default=3, help="saves timed in each mode; the median is reported")
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir, deleted after)")
    args = p.parse_args(argv)  # outside the redirect, or --help would print nothing
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_checkpoint_"))
    try:
        check_space(args, work)
        with contextlib.redirect_stdout(io.StringIO()):  # the manager's "saved ..." lines: only the table is wanted
            rows, header = measure(args, work)
    finally:
        if not args.dir:  # also after a failure: a full disk must not stay full of this script's files
            shutil.rmtree(work, ignore_errors=True)
    print(header)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def check_space(args, work):
    """Refuse to start where the files this script writes cannot fit: each of the saves' checkpoints
    (weights + AdamW's two moments: 3x the fp32 weights), written in three folders, plus a weights-only copy."""
    with torch.device("meta"):
        n_params = GPT(GPTConfig(**MODEL_PRESETS[args.model])).num_params(non_embedding=False)
    per_file = 3 * 4 * n_params
    needed = (3 * args.saves + 1) * per_file
    free = files.free_bytes(work)
    if free < needed:
        raise cli.UserError(f"{args.model} needs about {files.gib(needed)} for {args.saves} saves in each mode "
                            f"({files.gib(per_file)} per checkpoint) but {work} has {files.gib(free)} free; "
                            f"use --saves 1, a smaller --model, or --dir on a larger disk")


def measure(args, work):
    device_type = device_mod.select_device(args.device)
    device = device_mod.torch_device(device_type)
    dtype = device_mod.resolve_dtype(device_type, args.dtype)
    device_mod.apply_device_settings(device_type)
    cuda = device_type == "cuda"
    tokens_needed = (args.saves * 40 + 20) * args.micro_batch_size * args.seq_len + 1
    shards.write_shard(shards.shard_path(work / "data", "random", "train", 0),
                           np.random.default_rng(0).integers(0, shards.EOT_TOKEN, max(tokens_needed, 10_000)))
    loader = dataloader.ShardedDataLoader(work / "data", "train", args.micro_batch_size, args.seq_len, pin_memory=cuda)
    model, optimizer, scaler = build(args, device, dtype)
    spec = StepSpec(1, 1.0, device, dtype)

    def step():
        loss, _ = train_step(model, optimizer, scaler, loader, 6e-4, spec)
        return loss.item()  # waits for the device

    def manager(name, **kwargs):
        parts = {"model": model, "optimizer": optimizer, "scaler": scaler if scaler.is_enabled() else None,
                 "dataloader": loader, "rng": run_state.RandomState(), "train_state": run_state.TrainState()}
        return checkpoint_manager.CheckpointManager(work / name, parts, meta={"model_config": vars(model.config)},
                                                    checkpoint_interval=1, **kwargs)

    for _ in range(3):
        step()  # allocator growth, lazy optimizer state, kernel selection
    step_times = [seconds(device, step) for _ in range(5)]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        step()
        train_peak = torch.cuda.max_memory_allocated()

    sync = manager("sync")
    sync_stalls = []
    for i in range(args.saves):
        step()
        sync.save(i + 1)
        sync_stalls.append(sync.last_save_stall_s)
    full_file = checkpoint.step_path(work / "sync", args.saves)
    weights_only = work / "weights_only.pt"
    checkpoint.save_file({**checkpoint.load_checkpoint(full_file), "optimizer": None}, weights_only)

    background = manager("async", async_checkpoint=True)
    async_stalls, async_writes, overlapped = [], [], []
    for i in range(args.saves):
        step()
        background.save(i + 1)
        async_stalls.append(background.last_save_stall_s)
        while background.writing:  # train on while the writer thread works, as the loop does
            overlapped.append(seconds(device, step))
        background.wait()
        async_writes.append(background.last_write_s)
    background.close()

    # Resume as train_gpt2 does: a fresh model and an optimizer without state, then load into them.
    del model, optimizer, sync, background
    device_mod.free_memory(device)
    model, optimizer, scaler = build(args, device, dtype)
    fresh = manager("resume")
    if cuda:
        torch.cuda.synchronize()
        gpu_before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    host_before, _ = host_memory()
    host_peak_ok = reset_host_peak()
    resume_s = seconds(device, lambda: fresh.load(run_folder.find_resume(full_file.parent, path=full_file)))
    _, host_peak = host_memory()
    gpu_peak = torch.cuda.max_memory_allocated() if cuda else None
    step()  # the resumed state trains
    crc_s = seconds(device, checkpoint.check_zip_crc, full_file)  # the part of a resume that reads every byte

    mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
    med = statistics.median
    steady = med(step_times)
    rows = [
        ("checkpoint size (weights + optimizer)", mb(full_file.stat().st_size)),
        ("checkpoint size (weights only)", mb(weights_only.stat().st_size)),
        ("steady training step", f"{steady * 1000:,.1f} ms"),
        ("save, synchronous: training stall", f"{med(sync_stalls):.3f} s  ({med(sync_stalls) / steady:,.1f} steps)"),
        ("save, async: training stall (snapshot)", f"{med(async_stalls):.3f} s  ({med(async_stalls) / steady:,.1f} steps)"),
        ("save, async: background write", f"{med(async_writes):.3f} s"),
        ("steps during a background write", f"{len(overlapped)} at {med(overlapped) * 1000:,.1f} ms median"
         if overlapped else "0 (the write finished within one step)"),
        ("resume (CRC check + load + copy)", f"{resume_s:.3f} s, of which CRC check {crc_s:.3f} s"),
        ("resume: peak host RSS above before", mb(host_peak - host_before) if host_peak_ok and host_peak else "n/a (needs Linux /proc)"),
    ]
    if cuda:
        rows += [
            ("resume: GPU memory before (model + empty optim)", mb(gpu_before)),
            ("resume: peak GPU memory", f"{mb(gpu_peak)} (+{mb(gpu_peak - gpu_before)})"),
            ("steady training step: peak GPU memory", mb(train_peak)),
        ]
    n_params = sum(t.numel() for t in model.parameters())
    where = torch.cuda.get_device_name(device) if cuda else device_type
    header = (f"checkpoint costs: {args.model} ({n_params / 1e6:.1f}M parameters), {where}, {dtype}, "
              f"micro batch {args.micro_batch_size} x {args.seq_len}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} CPU threads; median of {args.saves} saves")
    return rows, header


def main(argv=None):
    return cli.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
