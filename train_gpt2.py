"""GPT-2 pretraining: the command line and one readable training loop.

    python train_gpt2.py                                   # embedded default: tiny Shakespeare, sized to the device
    python train_gpt2.py --data_root data/edu_fineweb10B --model gpt2 --auto_resume
    torchrun --nproc_per_node=4 train_gpt2.py --data_root data/edu_fineweb10B

The model is model.py; the run's configuration, built and checked from these flags, run_config.py.
Side concerns live in small modules, each one call from the loop: devices (device.py), processes
(distributed.py), data (dataloader.py), checkpoints (checkpoint_manager.py), signals (signals.py),
metrics (metrics.py), HellaSwag (hellaswag.py), hangs and lost peers (watchdog.py).
"""
import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import environment  # noqa: F401  before torch: it sets variables torch reads when it loads
import torch

import checkpoint
import checkpoint_manager
import cli
import dataloader
import device
import distributed
import files
import gpt2_hf
import hellaswag
import metrics as metrics_mod
import signals
import watchdog
from model import GPT, MODEL_PRESETS, sample_texts
from run_config import (DDP_BUCKET_CAP_MB, DEFAULT_DATA_ROOT, build_config, is_checkpoint_file, print_config,
                        resolve_flags)


class Diverged(cli.UserError):
    """The loss became NaN or inf: training stopped without saving the broken state."""


# -----------------------------------------------------------------------------
# The command line


def micro_batch_size_arg(text):
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise cli.argparse.ArgumentTypeError(f"{text!r} is neither a positive number of sequences nor auto")
    return int(text)


def parse_args(argv=None):
    p = cli.ArgumentParser(
        description="GPT-2 pretraining. With no arguments: prepares tiny Shakespeare and trains a model sized to this "
                    "device. Every flag can be written with hyphens too: --max-steps is --max_steps.")
    g = p.add_argument_group("data and output")
    g.add_argument("--data_root", default=None,
                   help=f"folder of <name>_{{train,val}}_NNNNNN.npy uint16 token shards (default: {DEFAULT_DATA_ROOT}, "
                        "prepared on first use, with the quickstart's settings)")
    g.add_argument("--log_dir", default="log", help="where metrics.jsonl and checkpoints are written")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, choices=sorted(MODEL_PRESETS),
                   help="model preset (default: gpt2, or a small one for the quickstart)")
    g.add_argument("--n_layer", type=int, default=None, help="override the preset's number of layers")
    g.add_argument("--n_head", type=int, default=None, help="override the preset's attention heads")
    g.add_argument("--n_embd", type=int, default=None, help="override the preset's width")
    g.add_argument("--block_size", type=int, default=1024, help="longest sequence the model can take (position table size), tokens")
    g.add_argument("--init_from", default=None, metavar="NAME|DIR|FILE",
                   help="start a new run (step 0) from pretrained weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl "
                        "(OpenAI's, via pip install transformers), a save_pretrained folder, or a checkpoint file: "
                        "this trainer's, nanoGPT's ckpt.pt, build-nanogpt's model_*.pt, llm.c's .bin; they set the "
                        "model shape")
    g.add_argument("--init_from_optimizer", action="store_true",
                   help="with --init_from FILE: continue the file's AdamW moments and step counts too (nanoGPT's "
                        "ckpt.pt and this trainer's checkpoints hold them), with this run's learning rate, betas and "
                        "weight decay; off: a fresh AdamW")
    g = p.add_argument_group("batch and schedule")
    g.add_argument("--total_batch_size", type=int, default=None,
                   help="tokens per optimizer step over all ranks (default: 524288 = 2**19; quickstart: by device)")
    g.add_argument("--micro_batch_size", type=micro_batch_size_arg, default=None,
                   help="sequences per forward pass per rank, or auto: the largest that fits the GPU, probed at start "
                        "(default: the device preset's)")
    g.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: 1024; quickstart: by device)")
    g.add_argument("--max_steps", type=int, default=None,
                   help="optimizer steps in the run (default: 19073, 10B tokens at 2**19; quickstart: by device)")
    g.add_argument("--warmup_steps", type=int, default=None, help="linear LR warm-up, steps; 0: none (default: 715)")
    g.add_argument("--max_lr", type=float, default=None, help="peak learning rate (default: 6e-4)")
    g.add_argument("--min_lr", type=float, default=None, help="final learning rate of the cosine decay (default: max_lr/10)")
    g.add_argument("--weight_decay", type=float, default=None, help="AdamW weight decay on 2-D weights (default: 0.1)")
    g.add_argument("--grad_clip", type=float, default=None, help="clip the global gradient norm to this; 0 disables (default: 1.0)")
    g.add_argument("--seed", type=int, default=1337, help="seed for the initial weights; the data order is fixed by the shards")
    g = p.add_argument_group("device")
    g.add_argument("--preset", default="auto", choices=device.DEVICE_CHOICES,
                   help="per-device defaults for micro batch, dtype, compile, pin_memory (device.PRESETS; auto: the "
                        "device's); flags win")
    device.add_device_arguments(g, dtype_default=None, dtype_help=" (default: the device preset's)")
    g.add_argument("--compile", nargs="?", const="default", default=None,
                   help="torch.compile the model; optional mode: default, reduce-overhead, max-autotune, "
                        "max-autotune-no-cudagraphs, none. A mode that fails falls back to default, then eager "
                        "(default: the device preset's)")
    g.add_argument("--num_threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, one per physical core)")
    g.add_argument("--pin_memory", action=cli.argparse.BooleanOptionalAction, default=None,
                   help="page-locked host batches for faster, asynchronous copies to the GPU (default: on for CUDA)")
    g.add_argument("--mps_memory_fraction", type=float, default=None,
                   help="Apple MPS: cap this process at this fraction of the GPU's recommended working set, 0..2 "
                        "(default: PYTORCH_MPS_HIGH_WATERMARK_RATIO, 1.0 unless you set it)")
    g.add_argument("--deterministic", action="store_true",
                   help="bit-identical runs and resumes on CUDA too (the CPU already is): deterministic kernels "
                        "everywhere, at a cost in speed (docs/DETERMINISM.md); one line at start says what is switched")
    g.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute activations in the backward pass: ~1/3 more compute, far less memory (off: speed first)")
    g.add_argument("--loss_chunk_rows", type=int, default=0, metavar="ROWS",
                   help="compute the loss ROWS token positions at a time, never holding all B*T x vocab logits; for "
                        "where --fused_loss cannot run (docs/PERFORMANCE.md measures it); 0: off, try 8192")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the weights, gradients and AdamW state over the ranks (FSDP2; each holds 1/N) for "
                        "models one GPU cannot hold; bf16 compute through FSDP's mixed precision. With torchrun, or "
                        "alone as a group of one. Checkpoints stay single files that any run can resume (off: DDP)")
    g.add_argument("--ddp_bucket_cap_mb", type=float, default=DDP_BUCKET_CAP_MB, metavar="MB",
                   help="DDP: gradient MB per all-reduce bucket; smaller buckets start communicating sooner, larger "
                        "ones send fewer messages (PyTorch's default)")
    g.add_argument("--fused_loss", choices=["auto", "on", "off"], default="auto",
                   help="the loss in Triton kernels whose gradient overwrites the logits: no second B*T x vocab buffer "
                        "(auto: on for CUDA with Triton, unless --loss_chunk_rows is set)")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval_interval", type=int, default=None,
                   help="validation loss every N steps, and at the last step; 0: at the last step only (default: 250)")
    g.add_argument("--eval_steps", type=int, default=None,
                   help="validation batches of --total_batch_size tokens each, the same tokens at any world size (default: 20)")
    g.add_argument("--hellaswag_interval", type=int, default=0,
                   help="HellaSwag accuracy every N steps and at the last step, into metrics.jsonl; 0: off")
    g.add_argument("--hellaswag_file", default=None,
                   help="local hellaswag_val.jsonl (default: download it once into $HELLASWAG_CACHE_DIR or "
                        f"{hellaswag.DEFAULT_CACHE_DIR})")
    g.add_argument("--hellaswag_limit", type=cli.positive_int, default=None,
                   help="score only the first N HellaSwag examples (default: all 10042)")
    g.add_argument("--log_interval", type=int, default=None,
                   help="print a step line (and time data/fwd_bwd/optim) every N steps; metrics.jsonl gets every step (default: 1)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write the metrics to <log_dir>/tensorboard (needs: pip install tensorboard)")
    g.add_argument("--wandb", action="store_true",
                   help="also log to Weights & Biases, rank 0 only (needs: pip install wandb; WANDB_MODE=offline works "
                        "without a network); --auto_resume continues the same W&B run")
    g.add_argument("--wandb_project", default="gpt2-train", help="W&B project")
    g.add_argument("--wandb_run_name", default=None, help="W&B run name (default: the --log_dir folder's name)")
    g.add_argument("--generate_interval", type=int, default=None,
                   help="print samples every N steps; 0: only at the end (default: 0)")
    g.add_argument("--prompt", default="\n", help="prompt for samples (default: a newline)")
    g.add_argument("--num_samples", type=int, default=2, help="samples printed each time")
    g.add_argument("--max_new_tokens", type=int, default=64, help="tokens per sample")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint_interval", type=int, default=None,
                   help="save every N steps and at the last step; 0: only at the end (default: 5000)")
    g.add_argument("--checkpoint_every_minutes", type=float, default=0, metavar="M",
                   help="also save when M minutes of wall time have passed since the last step checkpoint (or the "
                        "first step); rank 0's clock decides for all ranks; 0: off")
    g.add_argument("--auto_resume", action="store_true",
                   help="resume from the newest valid checkpoint in --log_dir if there is one")
    g.add_argument("--start_over", action="store_true",
                   help="train from step 0 in a --log_dir that holds a run: its files are moved into "
                        "<log_dir>/replaced_<time>/ first, nothing is deleted (without this flag, or --auto_resume, "
                        "such a folder is refused)")
    g.add_argument("--resume", action="store_true", help="resume from --checkpoint_path")
    g.add_argument("--checkpoint_path", default=None, help="checkpoint file for --resume")
    g.add_argument("--resume_from_checkpoint", default=None, metavar="PATH",
                   help="same as --resume --checkpoint_path PATH")
    g.add_argument("--keep_last_n_checkpoints", type=int, default=-1,
                   help="delete older step checkpoints beyond N; -1 keeps all")
    g.add_argument("--save_optimizer", default="all", choices=["all", "latest"],
                   help="optimizer state in every checkpoint, or only the newest (older ones keep weights only)")
    g.add_argument("--async_checkpoint", action="store_true", help="write checkpoints in a background thread")
    g.add_argument("--no_load_optimizer", "--reset_optimizer", dest="no_load_optimizer", action="store_true",
                   help="resume the weights only, with a fresh optimizer (fine-tuning, changed learning rate)")
    g = p.add_argument_group("faults")
    g.add_argument("--hang_timeout", type=float, default=None, metavar="SECONDS",
                   help="a rank that finishes no step (and makes no progress in evaluation or a checkpoint) for this "
                        "long writes every thread's stack to <log_dir>/failures/ and exits, so that torchrun "
                        "--max-restarts restarts the group; the collectives time out 120 s later; 0: off "
                        "(default: 900 on CUDA, off on the CPU and MPS)")
    return p.parse_args(argv)


def get_lr(step, config):
    """Linear warm-up to max_lr, then cosine decay to min_lr at max_steps."""
    if step < config.warmup_steps:
        return config.max_lr * (step + 1) / config.warmup_steps
    if step >= config.max_steps:
        return config.min_lr
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.max_lr - config.min_lr)


# -----------------------------------------------------------------------------
# The training step and evaluation


@dataclass(frozen=True)
class StepSpec:
    """What every training step does the same way."""

    grad_accum_steps: int
    grad_clip: float
    device: torch.device
    dtype: str  # autocast: bf16, fp16 or fp32 (FSDP: fp32, its mixed-precision policy casts instead)
    parallel: str = "none"  # "ddp" or "fsdp": gradients synchronised on the last micro step only


def train_step(model, optimizer, scaler, loader, lr, spec, timer=None):
    """One optimizer step over spec.grad_accum_steps micro batches; returns (mean loss, grad norm) as
    device tensors without waiting for the GPU. scripts/benchmark.py times this same function.
    timer (metrics.StepTimer) marks where the data, forward+backward and optimizer phases end."""
    timer = timer or metrics_mod.StepTimer(enabled=False)
    timer.start()
    optimizer.zero_grad(set_to_none=spec.parallel != "ddp")  # DDP: in place, the gradients stay views into its buckets
    loss_accum = torch.zeros((), device=spec.device)
    for micro_step in range(spec.grad_accum_steps):
        x, y = loader.next_batch()
        x, y = x.to(spec.device, non_blocking=True), y.to(spec.device, non_blocking=True)
        timer.mark("data")
        # DDP all-reduces and FSDP reduce-scatters the gradients only on the last micro step.
        sync = micro_step == spec.grad_accum_steps - 1
        if spec.parallel == "fsdp":
            model.set_requires_gradient_sync(sync)
        with model.no_sync() if spec.parallel == "ddp" and not sync else contextlib.nullcontext():
            with device.autocast(spec.device.type, spec.dtype):
                _, loss = model(x, y)
            loss = loss / spec.grad_accum_steps  # the gradient of the mean over the whole token batch
            loss_accum += loss.detach()
            scaler.scale(loss).backward()
        timer.mark("fwd_bwd")
    distributed.mean_over_ranks(loss_accum)
    scaler.unscale_(optimizer)  # no-op unless fp16: clip the true gradients
    norm = distributed.clip_grad_norm(model.parameters(), spec.grad_clip if spec.grad_clip > 0 else float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.step(optimizer)
    scaler.update()
    timer.mark("optim")
    return loss_accum, norm


@torch.no_grad()
def evaluate_loss(model, loader, steps, spec):
    """Mean validation loss over `steps` micro batches per rank, from the start of the val split.
    The caller scales steps by the accumulation steps, so every world size sees the same tokens."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=spec.device)
    for _ in range(steps):
        watchdog.progress("eval")
        x, y = loader.next_batch()
        x, y = x.to(spec.device, non_blocking=True), y.to(spec.device, non_blocking=True)
        with device.autocast(spec.device.type, spec.dtype):
            _, loss = model(x, y)
        total += loss.detach()
    total /= steps
    distributed.mean_over_ranks(total)
    model.train()
    return total.item()


def print_samples(model, enc, config, dev, step, rank, quiet=False):
    """Top-k samples from --prompt; seeded per rank and step so a resumed run prints the same."""
    texts = sample_texts(model, enc, config.prompt, config.num_samples, config.max_new_tokens, dev, config.dtype,
                         seed=config.seed + 1000 * rank + step)
    for i, text in enumerate([] if quiet else texts):
        print(f"[rank {rank}] sample {i} at step {step}: {config.prompt!r} -> {text!r}")


# -----------------------------------------------------------------------------
# The loop


def train(args):
    device_type = device.select_device(args.device)
    hang_timeout = resolve_flags(args, device_type)["hang_timeout"][0]  # the collectives wait past the watchdog
    ctx = distributed.setup(device_type, one_rank_group=args.fsdp, timeout=watchdog.collective_timeout(hang_timeout))
    dev = device.torch_device(device_type, ctx.local_rank)
    log = print if ctx.master else (lambda *a, **k: None)
    config = build_config(args, dev, ctx, log)
    lock = files.RunLock(config.log_dir, log).acquire() if ctx.master else None  # one trainer per folder, the whole run
    try:
        return train_run(config, dev, ctx, log)
    finally:
        if lock is not None:
            lock.release()


def build_model(config, dev, ctx, log):
    """The model on dev (sharded over the ranks with --fsdp) and its AdamW; weights from --init_from."""
    torch.manual_seed(config.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    from_transformers = config.init_from and not is_checkpoint_file(config.init_from)
    model = (gpt2_hf.from_pretrained(config.init_from, config.model_config) if from_transformers
             else GPT(config.model_config)).to(dev)
    model.set_run_options(config.activation_checkpointing, config.loss, config.loss_chunk_rows)
    log(f"model: {config.model} {model.num_params() / 1e6:.2f}M parameters (without position embeddings)")
    if config.fsdp:
        distributed.shard_fsdp(model, model.transformer.h, config.dtype)
        mine = sum(distributed.local(p).numel() for p in model.parameters())
        log(f"fsdp: weights, gradients and AdamW state sharded over {ctx.world_size} rank(s): "
            f"{mine / 1e6:.2f}M of {model.num_params(non_embedding=False) / 1e6:.2f}M parameters on each"
            + (", bf16 compute, fp32 gradient reduction" if config.dtype == "bf16" else ""))
    optimizer = model.configure_optimizer(config.weight_decay, config.max_lr, dev.type, log=log)
    if is_checkpoint_file(config.init_from):
        checkpoint_manager.init_from_file(config.init_from, model, optimizer, config.init_from_optimizer, log)
    return model, optimizer


def planned_saves(config, start_step):
    """Step checkpoints this run will write: every checkpoint_interval steps, and the last."""
    steps = range(start_step, config.max_steps)
    regular = [s for s in steps if config.checkpoint_interval > 0 and s > 0 and s % config.checkpoint_interval == 0]
    return len(set(regular) | {config.max_steps - 1})


def train_run(config, dev, ctx, log):
    """The training run of a checked configuration."""
    if ctx.master:
        print_config(config)
        if config.start_over and checkpoint.existing_run(config.log_dir):
            log(f"--start_over: the run that was in {config.log_dir} is now in {checkpoint.move_run_aside(config.log_dir)}")

    # Data: the quickstart prepares tiny Shakespeare once (rank 0), everyone else waits.
    if config.data_root == DEFAULT_DATA_ROOT and ctx.master:
        dataloader.ensure_tinyshakespeare(config.data_root)
    distributed.barrier()
    train_loader = dataloader.ShardedDataLoader(config.data_root, "train", config.micro_batch_size, config.seq_len,
                                                ctx.rank, ctx.world_size, pin_memory=config.pin_memory)
    val_loader = dataloader.ShardedDataLoader(config.data_root, "val", config.micro_batch_size, config.seq_len,
                                              ctx.rank, ctx.world_size, pin_memory=config.pin_memory,
                                              prefetch=False)  # each evaluation starts with reset(): nothing to read ahead

    raw_model, optimizer = build_model(config, dev, ctx, log)
    scaler = torch.amp.GradScaler(dev.type, enabled=config.dtype == "fp16")

    train_state, tracked = checkpoint.TrainState(), metrics_mod.TrackedRun()
    ckpt = checkpoint_manager.CheckpointManager(
        config.log_dir,
        {"model": raw_model, "optimizer": optimizer, "scaler": scaler if scaler.is_enabled() else None,
         "dataloader": train_loader, "rng": checkpoint.RandomState(log), "train_state": train_state,
         "tracking": tracked},
        meta={"model_config": asdict(config.model_config), "run_config": config.to_dict(), "world_size": ctx.world_size},
        interval=config.checkpoint_interval, keep_last_n=config.keep_last_n_checkpoints,
        save_optimizer=config.save_optimizer, async_save=config.async_checkpoint,
        every_minutes=config.checkpoint_every_minutes, log=log)
    start_step = ckpt.resume(auto=config.auto_resume, path=config.resume_from, load_optimizer=not config.reset_optimizer)
    train_state.keep_best(ckpt.best_val_loss_on_disk())  # best_model.pt stays the best the folder has seen
    ckpt.check_space(planned_saves(config, start_step))
    # torch.compile down the fallback chain, each mode checked on one micro batch (under DDP, as trained;
    # under FSDP block by block, so its hooks run between the compiled blocks).
    parallel = "fsdp" if config.fsdp else "ddp" if ctx.enabled else "none"
    wrap = (lambda m: distributed.wrap_ddp(m, ctx, config.ddp_bucket_cap_mb)) if parallel == "ddp" else None
    model, _ = device.compile_model(
        raw_model, dev.type, config.compile, wrap=wrap, parts=list(raw_model.transformer.h) if config.fsdp else None,
        trial=lambda m: device.forward_backward(m, config.micro_batch_size, config.seq_len, dev, config.dtype))
    spec = StepSpec(config.grad_accum_steps, config.grad_clip, dev, "fp32" if config.fsdp else config.dtype, parallel)
    throughput = metrics_mod.Throughput(config.total_batch_size, raw_model.flops_per_token(config.seq_len),
                                        device.peak_flops(dev, config.dtype),  # None where unknown: no MFU
                                        ctx.world_size)
    metrics = metrics_mod.Metrics(
        config.log_dir, throughput, enabled=ctx.master, device_type=dev.type, start_step=start_step,
        total_steps=config.max_steps, log_interval=config.log_interval, tensorboard=config.tensorboard,
        wandb=metrics_mod.WandbRun(config.wandb_project, config.wandb_run_name, config.to_dict(), tracked)
        if config.wandb else None)
    hellaswag_eval = hellaswag.TrainingEval(config.hellaswag_interval, config.hellaswag_file, config.hellaswag_limit,
                                            dev, config.dtype, ctx.rank, ctx.world_size, sharded=config.fsdp)
    enc = dataloader.get_tokenizer()

    val_loss = None
    # SIGTERM / Ctrl-C: finish the step, save, stop (handlers restored after); a hung rank exits (watchdog.py)
    with signals.GracefulStop() as stop, watchdog.watching(config.hang_timeout, config.log_dir, ctx.rank):
        for step in range(start_step, config.max_steps):
            watchdog.progress("train_step", step)
            last_step = step == config.max_steps - 1
            t0 = time.perf_counter()
            lr = get_lr(step, config)
            epoch = train_loader.epoch
            loss, norm = train_step(model, optimizer, scaler, train_loader, lr, spec, timer=metrics.timer)
            # The step's one host sync, for loss and norm together. It waits for the backward pass and the
            # clipping; the optimizer kernels queued after them finish within the next step's time.
            train_loss, norm = torch.stack([loss.float(), norm.float()]).tolist()
            dt = time.perf_counter() - t0
            if not math.isfinite(train_loss):
                raise Diverged(f"loss is {train_loss} at step {step}: stopped without saving. {ckpt.last_good()}"
                               "resume with --auto_resume, perhaps with a lower --max_lr or --grad_clip 1.0")
            train_state.record(step, train_loss)

            with ckpt.saved_on_error(step):  # an error from here on (evaluation, samples, metrics) still saves the step
                metrics.log_step(step, dt, loss=train_loss, lr=lr, norm=norm, **device.memory_stats(dev))
                val_loss = None
                if (config.eval_interval > 0 and step % config.eval_interval == 0) or last_step:
                    val_loss = evaluate_loss(model, val_loader, config.eval_steps * config.grad_accum_steps, spec)
                    metrics.log(step, val_loss=val_loss)
                if hellaswag_eval.due(step, last_step):
                    watchdog.progress("hellaswag")
                    metrics.log(step, **hellaswag_eval.run(model))
                if config.generate_interval > 0 and step > 0 and step % config.generate_interval == 0:
                    watchdog.progress("samples")
                    print_samples(raw_model, enc, config, dev, step, ctx.rank)
            improved = train_state.record(step, val_loss=val_loss)
            stopping = stop.agreed()
            epoch_done = train_loader.epoch if train_loader.epoch > epoch else None  # the data ran out in this step
            ckpt.maybe_save(step, best=improved, force=last_step or stopping, epoch=epoch_done)
            if stopping:
                log(f"stopped by {stop.signal_name} after step {step}; resume with --auto_resume")
                break
        else:
            if start_step < config.max_steps and (ctx.master or config.fsdp):  # FSDP: every rank takes part in a forward
                print_samples(raw_model, enc, config, dev, config.max_steps - 1, ctx.rank, quiet=not ctx.master)
    train_loader.close()
    ckpt.close()
    metrics.close()
    del model  # DDP's Reducer must go before the process group (distributed.close says why)
    distributed.close()
    return val_loss


def run(argv=None):
    args = parse_args(argv)
    try:
        return train(args)
    except RuntimeError as exc:  # torch.OutOfMemoryError, or MPS's RuntimeError saying so; a lost peer
        if not device.is_oom(exc) and watchdog.is_peer_failure(exc):
            raise watchdog.peer_lost(exc, args.log_dir, int(os.environ.get("RANK", 0))) from None
        if not device.is_oom(exc):
            raise
        raise device.DeviceError(device.oom_message(torch.device(device.select_device(args.device)),
                                                    args.micro_batch_size, args.seq_len,
                                                    args.activation_checkpointing)) from None


def main(argv=None):
    cli.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
