"""GPT-2 pretraining: the command line and one readable training loop.

    python train_gpt2.py                                   # embedded default: tiny Shakespeare, sized to the device
    python train_gpt2.py --data_root data/edu_fineweb10B --model gpt2 --auto_resume
    torchrun --nproc_per_node=4 train_gpt2.py --data_root data/edu_fineweb10B

The model is model.py; the run's configuration, built and checked from these flags, run_config.py.
Side concerns live in small modules, each one call from the loop: devices (device.py), processes
(distributed.py), data (dataloader.py), checkpoints (checkpoint_manager.py), signals (signals.py),
metrics (metrics.py), HellaSwag (hellaswag.py), hangs and lost peers (watchdog.py).
"""
import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import environment  # noqa: F401  before torch: it sets variables torch reads when it loads
import torch

import run_state
import checkpoint_manager
import cli
import config_file
import dataloader
import dataprep
import device
import distributed
import files
import full_state
import gpt2_hf
import hellaswag
import metrics as metrics_mod
import optimizers
import run_config
import run_folder
import shards
import signals
import watchdog
from cli import log
from model import GPT, sample_texts


class Diverged(cli.UserError):
    """The loss became NaN or inf: training stopped without saving the broken state."""


# -----------------------------------------------------------------------------
# The command line


def parse_args(argv=None):
    p = cli.ArgumentParser(
        description="GPT-2 pretraining. With no arguments: prepares tiny Shakespeare and trains a model sized to this "
                    "device. Every flag can be written with hyphens too: --max-steps is --max_steps; a boolean takes "
                    "a value too: --tensorboard=False.")
    run_config.add_arguments(p)  # every option is declared once, as a RunConfig field
    p.add_argument("--config", metavar="FILE|NAME",
                   help="options from a YAML, TOML or JSON file (or a file of configs/ by name: gpt2-124m); the "
                        "command line wins over it. A file given first, without --config, works too")
    p.add_argument("config_positional", nargs="?", metavar="CONFIG", help=cli.argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.config and args.config_positional:
        p.error(f"one config file, please: --config {args.config} or {args.config_positional}")
    spec = args.config or args.config_positional
    args.config, args.config_values = config_file.load(spec, p) if spec else (None, {})
    return args


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
    timer (metrics.StepTimer) marks where the data, forward, backward and optimizer phases end."""
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
            timer.mark("fwd")
            scaler.scale(loss).backward()
        timer.mark("bwd")
    distributed.mean_over_ranks(loss_accum)
    scaler.unscale_(optimizer)  # no-op unless fp16: clip the true gradients
    norm = distributed.clip_grad_norm(model.parameters(), spec.grad_clip if spec.grad_clip > 0 else float("inf"))
    optimizers.set_lr(optimizer, lr)  # Muon's groups (--optimizer muon) at their own scale of the schedule
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


def setup(args):
    """From the command line to a checked RunConfig, doing what the configuration needs done, in this order:
    the process group, the flags' checks (run_config.resolve, pure), the run folder's checks, the checkpoint a
    resume continues from (its settings become the run's: resolve again with them), the device's settings, the
    shape of --init_from, the micro batch probe, the run folder's lock and what a resume or --start_over moves
    aside: a refused command has written nothing. Returns (config, device, ctx, lock, resume)."""
    device_type = device.select_device(args.device or "auto")
    # Every flag checked before anything is read; the collectives wait past the hang watchdog (watchdog.py).
    config = run_config.resolve(args, device_type, int(os.environ.get("WORLD_SIZE", 1)), before_resume=True)
    ctx = distributed.setup(device_type, timeout=watchdog.collective_timeout(config.hang_timeout))
    if distributed.agree(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0, "max") and not (
            args.auto_resume or args.resume or args.resume_from_checkpoint or args.start_over):
        log("a torchrun restart: continuing the run in its --log_dir, as --auto_resume does")  # else refused, in vain
        args = argparse.Namespace(**{**vars(args), "auto_resume": True})
        config = run_config.resolve(args, device_type, ctx.world_size, before_resume=True)
    # Other machines may not see the folder: rank 0 looks, reads and decides; every rank raises its errors.
    distributed.on_rank0(run_folder.check_run_folder, config.log_dir, resuming=config.auto_resume or config.resume,
                         start_over=config.start_over)
    resume = distributed.on_rank0(run_folder.find_resume, config.log_dir, config.auto_resume,
                                  config.resume_from_checkpoint, config.reset_optimizer,
                                  share=lambda found: found and found.shared())
    if config.auto_resume:
        run_folder.check_other_machines(config.log_dir, resume and resume.path)
    stored = resume.run_config if resume else None
    config = run_config.resolve(args, device_type, ctx.world_size, stored=stored)
    for note in config.notes:
        log(note)
    if config.fsdp and not ctx.enabled:
        ctx = distributed.setup(device_type, one_rank_group=True,  # FSDP needs a process group, even of one
                                timeout=watchdog.collective_timeout(config.hang_timeout))
    dev = device.torch_device(device_type, ctx.local_rank)
    for line in device.apply_device_settings(dev.type, config.num_threads, config.mps_memory_fraction,
                                             config.deterministic):
        log(line)
    found = {"dtype": device.resolve_dtype(dev.type, config.dtype)}
    found["loss"], line = device.choose_loss(config.fused_loss, config.loss_chunk_rows, dev)
    log(line)
    if config.init_from:  # read on rank 0: the file may be on its machine only
        found["model_config"], found["init_from_transformers"] = distributed.on_rank0(init_shape, config)
    if config.micro_batch_size == "auto":
        model_config = found.get("model_config") or config.model_config
        found["micro_batch_size"], line = device.auto_micro_batch_size(
            lambda: GPT(model_config).set_run_options(config.activation_checkpointing, found["loss"],
                                                      config.loss_chunk_rows),
            config.total_batch_size // ctx.world_size, config.seq_len, dev, found["dtype"])
        log(line)
    config = run_config.resolve(args, device_type, ctx.world_size, stored=stored, found=found)
    lock = distributed.on_rank0(files.RunLock(config.log_dir).acquire, share=lambda lock: None)  # one per folder
    distributed.on_rank0(run_folder.make_room, config.log_dir, resume, config.start_over)
    return config, dev, ctx, lock, resume


def init_shape(config):
    """(model shape, from transformers?) of --init_from: a checkpoint file's, or OpenAI's weights via transformers."""
    if os.path.isfile(config.init_from):  # a checkpoint file, else a name or folder for transformers (gpt2_hf)
        return full_state.init_shape(config.init_from, config.block_size, config.init_from_optimizer,
                                     config.optimizer), False
    if config.init_from_optimizer:
        raise run_config.ConfigError(run_config.INIT_FROM_OPTIMIZER_NEEDS_A_FILE)
    return gpt2_hf.gpt_config(config.init_from, config.block_size), True


def train(args):
    config, dev, ctx, lock, resume = setup(args)
    try:
        if resume is not None and resume.step + 1 >= config.max_steps:
            log(f"already at step {resume.step} of --max_steps {config.max_steps}: nothing to train; raise "
                "--max_steps to continue")
            return None
        return train_run(config, dev, ctx, resume)
    except RuntimeError as exc:  # torch.OutOfMemoryError, or MPS's RuntimeError saying so
        if not device.is_oom(exc):
            raise
        raise device.DeviceError(device.oom_message(dev, config.micro_batch_size, config.seq_len,
                                                    config.activation_checkpointing)) from None
    finally:
        if lock is not None:
            lock.release()


def build_model(config, dev, ctx):
    """The model on dev (sharded over the ranks with --fsdp) and its optimizer (--optimizer); weights from --init_from."""
    torch.manual_seed(config.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    model = (gpt2_hf.from_pretrained(config.init_from, config.model_config) if config.init_from_transformers
             else GPT(config.model_config)).to(dev)
    model.set_run_options(config.activation_checkpointing, config.loss, config.loss_chunk_rows)
    log(f"model: {config.model} {model.num_params() / 1e6:.2f}M parameters (without position embeddings)")
    if config.fsdp:
        distributed.shard_fsdp(model, model.transformer.h, config.dtype)
        mine = sum(distributed.local(p).numel() for p in model.parameters())
        log(f"fsdp: weights, gradients and AdamW state sharded over {ctx.world_size} rank(s): "
            f"{mine / 1e6:.2f}M of {model.num_params(non_embedding=False) / 1e6:.2f}M parameters on each"
            + (", bf16 compute, fp32 gradient reduction" if config.dtype == "bf16" else ""))
    optimizer = optimizers.build(model, config.optimizer, lr=config.max_lr, weight_decay=config.weight_decay,
                                 muon_lr=config.muon_lr, muon_momentum=config.muon_momentum,
                                 muon_weight_decay=config.muon_weight_decay)
    if config.optimizer != "adamw":
        log(optimizers.describe(optimizer))
    if not optimizer.defaults.get("fused"):
        log(f"fused AdamW is not available on {dev.type}; using the for-each implementation")
    if config.init_from and not config.init_from_transformers:
        full_state.init_from_file(config.init_from, model, optimizer, config.init_from_optimizer)
    return model, optimizer


def planned_saves(config, start_step):
    """Step checkpoints this run will write: every checkpoint_interval steps, and the last."""
    steps = range(start_step, config.max_steps)
    regular = [s for s in steps if config.checkpoint_interval > 0 and s > 0 and s % config.checkpoint_interval == 0]
    return len(set(regular) | {config.max_steps - 1})


def load_resume(ckpt, resume, config, train_loader):
    """The resumed checkpoint into every part; the step to start at. Other data than the checkpoint's run read
    is refused, unless --data_root names other data on purpose: then that is read from its start."""
    change = distributed.on_rank0(lambda: train_loader.data_change(resume.ckpt["dataloader"]))
    skip = ()
    if change and dict(config.sources)["data_root"] == "flag" and config.data_root != resume.run_config.get("data_root"):
        log(f"resume: --data_root {config.data_root} is other data than the checkpoint's run read ({change}): it is "
            "read from its start")
        skip = ("dataloader",)
    elif change:
        raise dataloader.DataError(f"{config.data_root} is not the data the checkpoint's run read: {change}. Put that "
                                   "data back, or pass --data_root DIR to continue on other data (read from its start)")
    return ckpt.load(resume, config.reset_optimizer, skip)


def train_run(config, dev, ctx, resume=None):
    if ctx.master:
        run_config.print_config(config)
    enc = shards.get_tokenizer()  # before any file is written: offline without a cache, this is where it stops

    # Data: the quickstart prepares tiny Shakespeare once (rank 0), everyone else waits.
    if config.data_root == run_config.DEFAULT_DATA_ROOT and ctx.master:
        dataprep.ensure_tinyshakespeare(config.data_root)
    distributed.barrier()
    vocab_size = config.model_config.real_vocab_size  # a token id at or above it is refused when a shard is opened
    train_loader = dataloader.ShardedDataLoader(config.data_root, "train", config.micro_batch_size, config.seq_len,
                                                ctx.rank, ctx.world_size, pin_memory=config.pin_memory,
                                                vocab_size=vocab_size, shuffle=config.shuffle, seed=config.seed)
    val_loader = dataloader.ShardedDataLoader(config.data_root, "val", config.micro_batch_size, config.seq_len,
                                              ctx.rank, ctx.world_size, pin_memory=config.pin_memory, vocab_size=vocab_size,
                                              prefetch=False)  # each evaluation starts with reset(): nothing to read ahead

    raw_model, optimizer = build_model(config, dev, ctx)
    scaler = torch.amp.GradScaler(dev.type, enabled=config.dtype == "fp16")

    train_state, tracked = run_state.TrainState(), metrics_mod.TrackedRun()
    ckpt = checkpoint_manager.CheckpointManager(
        config.log_dir,
        {"model": raw_model, "optimizer": optimizer, "scaler": scaler if scaler.is_enabled() else None,
         "dataloader": train_loader, "rng": run_state.RandomState(), "train_state": train_state,
         "tracking": tracked},
        meta={"model_config": asdict(config.model_config), "run_config": config.to_dict(), "world_size": ctx.world_size},
        checkpoint_interval=config.checkpoint_interval, keep_last_n_checkpoints=config.keep_last_n_checkpoints,
        save_optimizer=config.save_optimizer, async_checkpoint=config.async_checkpoint,
        checkpoint_every_minutes=config.checkpoint_every_minutes)
    start_step = load_resume(ckpt, resume, config, train_loader) if resume is not None else 0
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
                                        metrics_mod.peak_flops(dev, config.dtype),  # None where unknown: no MFU
                                        ctx.world_size)
    metrics = metrics_mod.Metrics(
        config.log_dir, throughput, enabled=ctx.master, device_type=dev.type, start_step=start_step,
        total_steps=config.max_steps, log_interval=config.log_interval, tensorboard=config.tensorboard,
        wandb=metrics_mod.WandbRun(config.wandb_project, config.wandb_run_name, config.to_dict(), tracked)
        if config.wandb else None)
    hellaswag_eval = hellaswag.TrainingEval(config.hellaswag_interval, config.hellaswag_file, config.hellaswag_limit,
                                            dev, config.dtype, ctx.rank, ctx.world_size, sharded=config.fsdp)

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
                raise Diverged(f"loss is {train_loss} at step {step}: stopped without saving. {ckpt.diverged(step)}")
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
            ckpt.maybe_save(step, best=improved, force=last_step or stopping, epoch=epoch_done,
                            healthy=train_state.healthy())
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
    except RuntimeError as exc:  # a lost peer outside the loop (setup): as watchdog.watching does inside it
        if not watchdog.is_peer_failure(exc):
            raise
        raise watchdog.peer_lost(exc, args.log_dir or "log", int(os.environ.get("RANK", 0))) from None


def main(argv=None):
    cli.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
