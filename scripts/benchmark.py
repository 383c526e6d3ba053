#!/usr/bin/env python3
"""Time the real training step (train_gpt2.train_step: accumulation, clipping, fused AdamW,
compile as configured) and print one table row per configuration.

    python -m scripts.benchmark --model gpt2 --micro_batch_size 64 --seq_len 1024 --compile none default
    python -m scripts.benchmark --model d4 --micro_batch_size 8 --seq_len 64 --device cpu
    python -m scripts.benchmark --model gpt2 --data_root data/edu_fineweb10B     # real shards instead of random tokens
    torchrun --nproc_per_node=2 -m scripts.benchmark --model gpt2 --compile default --ddp_bucket_cap_mb 25 100
    python -m scripts.benchmark --model gpt2-xl --micro_batch_size 16 --fsdp off on      # FSDP against DDP at world size 1

Under torchrun each configuration runs in DDP as train_gpt2.py does (one micro batch per rank per
step unless --grad_accum_steps); rows give tokens/s per GPU and for all GPUs, to compare with
one GPU's row for the scaling efficiency.

Each configuration runs --warmup steps (compilation, cuDNN autotuning, allocator growth)
then --steps timed steps; the median step time is reported. MFU = model FLOPs per second
(6N + 12 * n_layer * n_embd * T per token, N without position embeddings) over the GPU's
datasheet peak for the precision (metrics.PEAK_FLOPS); blank where the peak is unknown.
"""
import itertools
import os
import random
import statistics
import sys
import time
import traceback

if __name__ == "__main__" and not __package__:  # started as a path: say the command that works, exit 2
    from _as_module import exit_with_module_command  # scripts/ is sys.path[0] here; it imports nothing of ours
    exit_with_module_command(__file__)

import environment  # noqa: E402,F401  before torch: it sets variables torch reads when it loads
import torch  # noqa: E402

import cli  # noqa: E402
import dataloader  # noqa: E402
import device as device_mod  # noqa: E402
import distributed  # noqa: E402
import metrics  # noqa: E402
import shards  # noqa: E402
from model import ATTENTION_BACKENDS, GPT, GPTConfig, MODEL_PRESETS, attention_backend  # noqa: E402
from run_config import DDP_BUCKET_CAP_MB  # noqa: E402
from train_gpt2 import StepSpec, train_step  # noqa: E402


class SyntheticLoader:
    """Random GPT-2 token ids, pre-generated (pinned on CUDA) so the loader costs what a real one does."""

    def __init__(self, batch_size, seq_len, pin_memory, n_batches=8):
        g = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(n_batches):
            window = torch.randint(0, shards.EOT_TOKEN + 1, (batch_size * seq_len + 1,), generator=g)
            x, y = window[:-1].view(batch_size, seq_len), window[1:].view(batch_size, seq_len)
            self.batches.append((x.pin_memory(), y.pin_memory()) if pin_memory else (x, y))
        self.cycle = itertools.cycle(self.batches)

    def next_batch(self):
        return next(self.cycle)


def loss_name(loss, loss_chunk_rows):
    return f"chunk{loss_chunk_rows}" if loss == "chunked" else loss


def seconds(dev, fn, *args, **kwargs):
    """The wall time of fn(*args, **kwargs), from an idle device to an idle device."""
    device_mod.synchronize(dev)
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    device_mod.synchronize(dev)
    return time.perf_counter() - t0


def bench_config(args, model_name, micro_batch_size, compile_mode, loss, loss_chunk_rows, layout, dev, dtype, ddp):
    """layout: ("ddp", bucket MB, bucket view) or ("fsdp", None, None); plain one process when not distributed."""
    parallel, bucket_mb, bucket_view = layout if ddp.enabled else ("none", None, None)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=max(1024, args.seq_len), **MODEL_PRESETS[model_name])).to(dev)
    model.set_run_options(loss=loss, loss_chunk_rows=loss_chunk_rows, activation_checkpointing=args.activation_checkpointing)
    if parallel == "fsdp":
        distributed.shard_fsdp(model, model.transformer.h, dtype)
    optimizer = model.configure_optimizer(0.1, 6e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=(dtype == "fp16"))
    wrap = (lambda m: distributed.wrap_ddp(m, ddp, bucket_mb, bucket_view)) if parallel == "ddp" else None
    compiled, used_mode = device_mod.compile_model(model, dev.type, compile_mode, wrap=wrap,
                                                   parts=list(model.transformer.h) if parallel == "fsdp" else None)
    pin = dev.type == "cuda"
    if args.data_root:
        loader = dataloader.ShardedDataLoader(args.data_root, "train", micro_batch_size, args.seq_len,
                                              ddp.rank, ddp.world_size, pin_memory=pin)
    else:
        loader = SyntheticLoader(micro_batch_size, args.seq_len, pin)
    tokens_per_step = micro_batch_size * args.seq_len * args.grad_accum_steps
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []
    spec = StepSpec(args.grad_accum_steps, 1.0, dev, "fp32" if parallel == "fsdp" else dtype, parallel)

    def step():
        loss, _ = train_step(compiled, optimizer, scaler, loader, 6e-4, spec)
        losses.append(loss.item())  # one host sync per step, as the trainer's (loss and norm in one read)

    with attention_backend(args.sdpa_backend):
        times = [seconds(dev, step) for _ in range(args.warmup + args.steps)][args.warmup:]
        if args.profile:
            profile_steps(step, dev, f"{model_name} B={micro_batch_size} compile={used_mode}")
    dt = statistics.median(times)
    mfu = metrics.mfu(model.flops_per_token(args.seq_len), tokens_per_step, dt, metrics.peak_flops(dev, dtype))
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    row = dict(model=model_name, B=micro_batch_size, T=args.seq_len, accum=args.grad_accum_steps, compile=used_mode,
               loss_kind=loss_name(loss, loss_chunk_rows), dtype=dtype, ms=dt * 1000, steps_s=1 / dt,
               tok_s=tokens_per_step / dt, mfu=mfu, mem=mem, spread=(max(times) - min(times)) / dt, loss=losses[-1],
               parallel=f"ddp {bucket_mb:g} MB{'' if bucket_view else ', copies'}" if parallel == "ddp" else
               "fsdp" if parallel == "fsdp" else "-")
    del compiled, model, optimizer
    device_mod.free_memory(dev)
    return row


def set_inductor_config(setting):
    """--inductor KEY=VALUE: set one torch._inductor.config attribute (triton.cudagraphs: a sub-config's)."""
    import ast

    import torch._inductor.config as inductor_config

    key, sep, text = setting.partition("=")
    *parents, name = key.split(".")
    target = inductor_config
    for parent in parents:
        target = getattr(target, parent, None)
    if not sep or target is None or not hasattr(target, name):
        sys.exit(f"error: --inductor {setting!r}: want KEY=VALUE with KEY in torch._inductor.config, "
                 f"e.g. coordinate_descent_tuning=True")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a plain string such as a backend name
    setattr(target, name, value)


def profile_steps(step, dev, title, n_steps=3, top=40):
    """Where a step's device time goes: the top kernels by total time over n_steps (every rank profiles, as
    every rank steps; the table goes to stdout, which is rank 0's alone)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(n_steps):
            step()
        device_mod.synchronize(dev)
    sort_key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(f"profile of {n_steps} steps, {title}:")
    print(prof.key_averages().table(sort_by=sort_key, row_limit=top, max_name_column_width=70))


def bench_loader(args, micro_batch_size):
    """Tokens per second the data loader alone can feed (host side: memmap slice, int64, pin)."""
    if not args.data_root:
        return None
    loader = dataloader.ShardedDataLoader(args.data_root, "train", micro_batch_size, args.seq_len,
                                          pin_memory=torch.cuda.is_available())
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        loader.next_batch()
    return n * micro_batch_size * args.seq_len / (time.perf_counter() - t0)


def bench_hellaswag(args, dev, dtype):
    """Seconds for HellaSwag over --hellaswag synthetic examples of the validation set's shape
    (random tokens; context 20-110 tokens, 4 endings of 8-60), with the first --model, untrained."""
    import hellaswag

    rng = random.Random(0)
    examples = [hellaswag.RenderedExample([rng.randrange(shards.EOT_TOKEN) for _ in range(rng.randint(20, 110))],
                                          [[rng.randrange(shards.EOT_TOKEN) for _ in range(rng.randint(8, 60))]
                                           for _ in range(4)], rng.randrange(4))
                for _ in range(args.hellaswag)]
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL_PRESETS[args.model[0]])).to(dev)
    results = []
    for mode, batch_examples in itertools.product(args.compile, args.hellaswag_batch):
        scored, used_mode = device_mod.compile_model(model, dev.type, mode)
        runs = [seconds(dev, hellaswag.evaluate, scored, examples, dev, dtype, batch_examples=batch_examples)
                for _ in range(2)]  # the first pass includes compilation (one graph per padded length)
        results.append((used_mode, batch_examples, runs))
    print(f"HellaSwag, {args.hellaswag} synthetic examples, {args.model[0]}, {dtype}:")
    for used_mode, batch_examples, (first, second) in results:
        print(f"  compile {used_mode:<15} {batch_examples:>4} examples/batch: {second:6.2f} s "
              f"({args.hellaswag / second:,.0f} examples/s; first pass {first:.2f} s)")


def run(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--model", nargs="+", default=["gpt2"], choices=sorted(MODEL_PRESETS), help="one or more presets")
    p.add_argument("--micro_batch_size", type=int, nargs="+", default=[64], help="sequences per forward pass")
    p.add_argument("--seq_len", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--grad_accum_steps", type=int, default=1, help="micro batches per optimizer step")
    p.add_argument("--compile", nargs="+", default=["none"], help="compile modes: none, default, reduce-overhead, max-autotune")
    device_mod.add_device_arguments(p)
    p.add_argument("--data_root", default=None, help="time on real shards instead of random tokens")
    p.add_argument("--sdpa_backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="attention kernel family (auto: PyTorch's choice)")
    p.add_argument("--profile", action="store_true", help="after timing, print the top kernels of 3 profiled steps")
    p.add_argument("--hellaswag", type=int, default=0, metavar="N",
                   help="instead of training steps, time HellaSwag on N synthetic examples (hellaswag.VAL_SIZE: the validation set)")
    p.add_argument("--hellaswag_batch", type=int, nargs="+", default=[16], help="examples per forward pass for --hellaswag")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--loss_chunk_rows", type=int, nargs="+", default=[0],
                   help="rows of logits the loss takes at a time; 0: the full logits, then the loss below")
    p.add_argument("--fused_loss", nargs="+", default=["auto"], choices=["auto", "on", "off"],
                   help="the Triton loss of triton_loss.py (auto: on where it can run, as train_gpt2.py)")
    p.add_argument("--ddp_bucket_cap_mb", type=float, nargs="+", default=[DDP_BUCKET_CAP_MB], metavar="MB",
                   help="under torchrun: DDP gradient MB per all-reduce bucket (train_gpt2.py's flag of that name)")
    p.add_argument("--ddp_bucket_view", nargs="+", default=["on"], choices=["on", "off"],
                   help="under torchrun: gradients as views into DDP's buckets (on: train_gpt2.py's choice) or copies (off: PyTorch's default)")
    p.add_argument("--fsdp", nargs="+", default=["off"], choices=["off", "on"],
                   help="on: shard over the ranks with FSDP2 as train_gpt2.py --fsdp (without torchrun: a group of one, "
                        "and the DDP rows run DDP at world size 1 to compare); off: DDP under torchrun")
    p.add_argument("--activation_checkpointing", action="store_true", help="recompute block activations in the backward pass")
    p.add_argument("--deterministic", nargs="+", default=["off"], choices=["off", "on"],
                   help="train_gpt2.py --deterministic off and/or on (with on, CUBLAS_WORKSPACE_CONFIG is set at start "
                        "for every row: cuBLAS reads it once)")
    p.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                   help="torch._inductor.config settings for every compiled row, e.g. coordinate_descent_tuning=True")
    args = p.parse_args(argv)

    device_type = device_mod.select_device(args.device)
    ddp = distributed.setup(device_type, one_rank_group="on" in args.fsdp)
    dev = device_mod.torch_device(device_type, ddp.local_rank)
    dtype = device_mod.resolve_dtype(dev.type, args.dtype)
    if not ddp.master:
        sys.stdout = open(os.devnull, "w")  # one table, rank 0's; every rank runs every configuration
    for line in device_mod.apply_device_settings(dev.type, deterministic="on" in args.deterministic):
        print(line)
    # The loss kinds the --fused_loss x --loss_chunk_rows grid asks for, resolved as train_gpt2.py resolves them.
    losses = list(dict.fromkeys((device_mod.choose_loss(fused, chunk, dev)[0], chunk)
                                for fused in args.fused_loss for chunk in args.loss_chunk_rows
                                if not (fused == "on" and chunk)))
    for setting in args.inductor:
        set_inductor_config(setting)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    print(f"device: {name} x {ddp.world_size}, torch {torch.__version__}, data: {args.data_root or 'synthetic'}, "
          f"attention: {args.sdpa_backend}, inductor: {' '.join(args.inductor) or 'defaults'}")
    buckets = list(itertools.product(args.ddp_bucket_cap_mb, [v == "on" for v in args.ddp_bucket_view]))
    if not ddp.enabled and buckets != [(DDP_BUCKET_CAP_MB, True)]:
        print("ddp: --ddp_bucket_cap_mb / --ddp_bucket_view apply under torchrun only; this is one process")
        buckets = [(DDP_BUCKET_CAP_MB, True)]
    layouts = ([("ddp", mb, view) for mb, view in buckets] if "off" in args.fsdp else []) + \
        ([("fsdp", None, None)] if "on" in args.fsdp else [])
    if args.hellaswag:
        if ddp.enabled:
            sys.exit("error: --hellaswag times one GPU; run it with python, not torchrun")
        bench_hellaswag(args, dev, dtype)
        return
    header = f"{'model':<12}{'B':>4}{'T':>6}{'accum':>6}  {'compile':<17}{'loss':<10}{'dtype':<6}{'ms/step':>9}{'steps/s':>9}" \
             f"{'tok/s/GPU' if ddp.enabled else 'tok/s':>11}{'MFU':>7}{'peak GiB':>9}{'spread':>8}{'loss':>8}{'determ.':>8}" \
             + (f"{'tok/s all':>12}  parallel" if ddp.enabled else "")
    rows = []
    for model_name, B, mode, (loss, chunk), layout, deterministic in itertools.product(
            args.model, args.micro_batch_size, args.compile, losses, layouts, args.deterministic):
        device_mod.set_deterministic(dev.type, deterministic == "on")
        torch.backends.cudnn.benchmark = deterministic == "off"
        try:
            r = bench_config(args, model_name, B, mode, loss, chunk, layout, dev, dtype, ddp)
        except torch.OutOfMemoryError:
            print(f"{model_name} B={B} {mode}: out of memory")
            torch.cuda.empty_cache()
            continue
        except Exception as exc:  # one failing configuration (say a compile mode) must not end the table
            print(f"{model_name} B={B} {mode} loss={loss_name(loss, chunk)}: failed: {type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc(limit=-8)
            continue
        rows.append(r)
        if len(rows) == 1:
            print(header)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        mem = f"{r['mem']:.1f}" if r["mem"] else "-"
        print(f"{r['model']:<12}{r['B']:>4}{r['T']:>6}{r['accum']:>6}  {r['compile']:<17}{r['loss_kind']:<10}{r['dtype']:<6}{r['ms']:>9.1f}"
              f"{r['steps_s']:>9.2f}{r['tok_s']:>11,.0f}{mfu:>7}{mem:>9}{r['spread']:>8.1%}{r['loss']:>8.3f}"
              f"{deterministic:>8}"
              + (f"{r['tok_s'] * ddp.world_size:>12,.0f}  {r['parallel']}" if ddp.enabled else ""), flush=True)
    rate = bench_loader(args, args.micro_batch_size[0])
    if rate:
        print(f"data loader alone: {rate:,.0f} tokens/s (micro batch {args.micro_batch_size[0]} x {args.seq_len})")
    distributed.close()


def main(argv=None):
    return cli.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
