"""The run configuration: built once from the command line's flags, the quickstart or the GPT-2
recipe, the device preset and the automatic choices (device settings, loss kernels, micro batch
probe, --init_from FILE's shape); checked, then frozen. It is what the trainer prints at start and
stores in every checkpoint.

    config = build_config(args, device, dist_context, log)   # a frozen RunConfig, or one ConfigError line
    print_config(config)                                       # the table: each value and where it came from
    resolve_flags(args, device_type) -> {name: (value, source)}

A value comes from, in order: the flag; the quickstart (no --data_root) or the recipe; the device
preset (device.PRESETS); a default. Every numeric flag is checked before anything is written.
"""
import math
import os
from dataclasses import asdict, dataclass, fields

import environment  # noqa: F401  before torch: it sets variables torch reads when it loads
import torch

import checkpoint
import cli
import device
import distributed
import files
import gpt2_hf
from model import GPT, GPTConfig, MODEL_PRESETS, choose_loss

# GPT-2 124M on FineWeb-Edu 10B tokens, the build-nanogpt / llm.c recipe.
RECIPE = dict(
    model="gpt2", seq_len=1024, total_batch_size=524288, max_steps=19073, warmup_steps=715,
    max_lr=6e-4, min_lr=6e-5, weight_decay=0.1, grad_clip=1.0, eval_interval=250, eval_steps=20,
    checkpoint_interval=5000, generate_interval=0, log_interval=1,
)
# Without --data_root: tiny Shakespeare, sized so a first run shows the loss fall and a sample in minutes
# (docs/RESULTS.md has the runs these were chosen from).
QUICKSTART = {
    # compile off: 300 eager steps of GPT-2 take less time than compiling it
    "cuda": dict(model="gpt2", seq_len=1024, micro_batch_size=16, total_batch_size=16384, max_steps=300,
                 warmup_steps=30, max_lr=6e-4, min_lr=6e-5, eval_interval=50, eval_steps=2, checkpoint_interval=300,
                 compile="none"),
    "mps": dict(model="d6", seq_len=256, micro_batch_size=16, total_batch_size=4096, max_steps=500,
                warmup_steps=30, max_lr=1e-3, min_lr=1e-4, eval_interval=50, eval_steps=4, checkpoint_interval=500),
    # LR 1e-3 -> 2e-4: higher spiked the loss, lower ended worse (docs/RESULTS.md)
    "cpu": dict(model="d4", seq_len=64, micro_batch_size=8, total_batch_size=512, max_steps=300,
                warmup_steps=20, max_lr=1e-3, min_lr=2e-4, eval_interval=50, eval_steps=4, checkpoint_interval=300),
}
DEFAULT_DATA_ROOT = os.path.join("data", "tinyshakespeare")
DDP_BUCKET_CAP_MB = 25.0  # PyTorch's default all-reduce bucket size; --ddp_bucket_cap_mb
# Flags whose default depends on the run (quickstart or recipe) and the device (preset): they
# default to None in the parser, so that a flag the user gave can be told from a default.
LAYERED = ("data_root", "model", "total_batch_size", "micro_batch_size", "seq_len", "max_steps", "warmup_steps",
           "max_lr", "min_lr", "weight_decay", "grad_clip", "dtype", "compile", "pin_memory", "num_threads",
           "eval_interval", "eval_steps", "log_interval", "generate_interval", "checkpoint_interval", "hang_timeout")


class ConfigError(cli.UserError):
    """A flag, or a combination of flags, that cannot work; the message names the flag and the fix."""


# -----------------------------------------------------------------------------
# The run configuration: built once from the flags, presets and automatic choices, checked,
# frozen. It is what is printed at start and stored in checkpoints.


@dataclass(frozen=True)
class RunConfig:
    data_root: str
    log_dir: str
    model: str
    model_config: GPTConfig
    init_from: str
    init_from_optimizer: bool
    seed: int
    total_batch_size: int
    micro_batch_size: int
    seq_len: int
    grad_accum_steps: int
    max_steps: int
    warmup_steps: int
    max_lr: float
    min_lr: float
    weight_decay: float
    grad_clip: float
    device: str
    world_size: int
    preset: str
    dtype: str
    compile: str
    num_threads: int
    pin_memory: bool
    mps_memory_fraction: float
    deterministic: bool
    activation_checkpointing: bool
    loss: str  # model.LOSSES
    loss_chunk_rows: int
    fused_loss: str  # as asked: auto, on, off
    fsdp: bool
    ddp_bucket_cap_mb: float
    eval_interval: int
    eval_steps: int
    hellaswag_interval: int
    hellaswag_file: str
    hellaswag_limit: int
    log_interval: int
    tensorboard: bool
    wandb: bool
    wandb_project: str
    wandb_run_name: str
    generate_interval: int
    prompt: str
    num_samples: int
    max_new_tokens: int
    checkpoint_interval: int
    auto_resume: bool
    start_over: bool
    resume_from: str
    keep_last_n_checkpoints: int
    save_optimizer: str
    async_checkpoint: bool
    reset_optimizer: bool
    checkpoint_every_minutes: float  # issue 23: also save by wall time (0: off)
    hang_timeout: float  # issue 23: seconds without progress before a rank exits (watchdog.py); 0: off
    sources: tuple = ()  # (name, where its value came from), for the table printed at start

    def to_dict(self):
        """Plain values for checkpoints (weights_only loading accepts them)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sources"}
        d["model_config"] = asdict(self.model_config)
        return d


# (flag, allowed?, what to use instead): one error line each, before anything is written.
CHECKS = [
    ("max_steps", lambda v: v >= 1, "at least 1"),
    ("warmup_steps", lambda v: v >= 0, "0 (no warm-up) or more"),
    ("max_lr", lambda v: math.isfinite(v) and v >= 0, "a finite learning rate, 0 or more, e.g. 6e-4"),
    ("min_lr", lambda v: math.isfinite(v) and v >= 0, "a finite learning rate of 0 or more, e.g. max_lr / 10"),
    ("weight_decay", lambda v: math.isfinite(v) and v >= 0, "0 (no decay) or more, e.g. 0.1"),
    ("grad_clip", lambda v: math.isfinite(v) and v >= 0, "0 (no clipping) or a norm above 0, e.g. 1.0"),
    ("total_batch_size", lambda v: v >= 1, "a number of tokens above 0, e.g. 524288"),
    ("seq_len", lambda v: v >= 1, "a number of tokens above 0, e.g. 1024"),
    ("block_size", lambda v: v >= 1, "a number of positions above 0, e.g. 1024"),
    ("n_layer", lambda v: v is None or v >= 1, "1 or more"),
    ("n_head", lambda v: v is None or v >= 1, "1 or more"),
    ("n_embd", lambda v: v is None or v >= 1, "1 or more"),
    ("eval_interval", lambda v: v >= 0, "0 (at the last step only) or more"),
    ("eval_steps", lambda v: v >= 1, "1 or more batches"),
    ("hellaswag_interval", lambda v: v >= 0, "0 (off) or more"),
    ("log_interval", lambda v: v >= 1, "1 or more"),
    ("generate_interval", lambda v: v >= 0, "0 (at the end only) or more"),
    ("num_samples", lambda v: v >= 1, "1 or more"),
    ("max_new_tokens", lambda v: v >= 1, "1 or more"),
    ("checkpoint_interval", lambda v: v >= 0, "0 (at the last step only) or a number of steps"),
    ("checkpoint_every_minutes", lambda v: math.isfinite(v) and v >= 0, "0 (off) or minutes, e.g. 30"),
    ("hang_timeout", lambda v: math.isfinite(v) and v >= 0, "0 (off) or seconds, e.g. 900"),
    ("keep_last_n_checkpoints", lambda v: v == -1 or v >= 1, "-1 (keep all) or 1 or more"),
    ("num_threads", lambda v: v >= 1, "1 or more threads"),
    ("loss_chunk_rows", lambda v: v >= 0, "0 (off) or a row count such as 8192"),
    ("ddp_bucket_cap_mb", lambda v: math.isfinite(v) and v > 0, "PyTorch's 25, or a size such as 100"),
    ("mps_memory_fraction", lambda v: v is None or (math.isfinite(v) and 0 <= v <= 2),
     "a fraction of the recommended working set in 0..2, e.g. 0.8"),
]


def resolve_flags(args, device_type):
    """{name: (value, source)} for every flag: the user's, else the quickstart's or the recipe's,
    else the device preset's, else the default."""
    preset_name = device_type if args.preset == "auto" else args.preset
    layers = [("preset:" + preset_name, device.PRESETS[preset_name]),
              ("quickstart:" + device_type, QUICKSTART[device_type]) if args.data_root is None else ("recipe", RECIPE)]
    values = {name: (value, "flag") for name, value in vars(args).items()}
    for name in LAYERED:
        if values[name][0] is not None:
            continue
        for layer_name, layer in reversed(layers):  # quickstart/recipe first: they know the run's shape
            if name in layer:
                values[name] = (layer[name], layer_name)
                break
        else:
            defaults = {"data_root": DEFAULT_DATA_ROOT, "pin_memory": False, "num_threads": torch.get_num_threads()}
            if name in defaults or name in RECIPE:
                values[name] = (defaults.get(name, RECIPE.get(name)), "default")
    min_lr, source = values["min_lr"]
    if min_lr is None or (source != "flag" and min_lr > values["max_lr"][0]):  # a preset's min_lr above a --max_lr
        values["min_lr"] = (values["max_lr"][0] * 0.1, "max_lr/10")
    values["preset"] = (preset_name, values["preset"][1] if args.preset != "auto" else "auto")
    return values


def check_flags(v):
    """One ConfigError line for the first flag (or combination) that cannot work."""
    for name, allowed, instead in CHECKS:
        if not allowed(v[name]):
            raise ConfigError(f"--{name} {v[name]} cannot work: use {instead}")
    if v["min_lr"] > v["max_lr"]:
        raise ConfigError(f"--min_lr {v['min_lr']} is above --max_lr {v['max_lr']}: the schedule decays from max_lr "
                          "to min_lr; lower --min_lr")
    if v["resume"] and not v["checkpoint_path"]:
        raise ConfigError("--resume needs --checkpoint_path PATH (or use --resume_from_checkpoint PATH, or --auto_resume)")
    if v["init_from"] and (v["model_source"] == "flag" or any(v[k] is not None for k in ("n_layer", "n_head", "n_embd"))):
        raise ConfigError("--init_from takes the model shape from the weights; drop --model, --n_layer, --n_head and --n_embd")
    if v["start_over"] and (v["auto_resume"] or v["resume"]):
        raise ConfigError("--start_over begins a new run; it cannot also resume (--auto_resume, --resume): drop one")
    if v["init_from_optimizer"] and not is_checkpoint_file(v["init_from"]):
        raise ConfigError("--init_from_optimizer needs --init_from FILE, a checkpoint file holding an optimizer state "
                          "(nanoGPT's ckpt.pt, this trainer's model_*.pt); drop it, or name such a file")


def check_run_folder(v):
    """The --log_dir is free: no other trainer holds it, and a run in it is resumed or explicitly
    started over, never silently overwritten."""
    files.RunLock.check(v["log_dir"])
    newest = checkpoint.existing_run(v["log_dir"])
    if newest is not None and not (v["auto_resume"] or v["resume"] or v["start_over"]):
        raise ConfigError(f"{v['log_dir']} already holds a run (newest: {newest.name}); continue it with --auto_resume, "
                          "start a new one in another --log_dir, or pass --start_over to move it aside and train from "
                          "step 0 here")


def is_checkpoint_file(init_from):
    """--init_from FILE (checkpoint_manager.init_from_file), rather than a name or folder for transformers (gpt2_hf)."""
    return bool(init_from) and os.path.isfile(init_from)


def file_model_config(v):
    """--init_from FILE: the file's model shape, its position table cut to --block_size where that is shorter
    (as gpt2_hf does). Read here, before anything is written, so that what the file cannot do is refused first."""
    path = v["init_from"]
    _, stored, ckpt = checkpoint.read_weights(path, for_training=True)
    config = GPTConfig(**{**stored, "block_size": min(v["block_size"], stored["block_size"])})
    if v["init_from_optimizer"] and ckpt.get("optimizer") is None:
        raise ConfigError(f"--init_from_optimizer: {path} ({checkpoint.summary(ckpt)}) holds no AdamW state that maps "
                          "onto this trainer's; drop the flag to start with a fresh one")
    if v["init_from_optimizer"] and config.block_size < stored["block_size"]:
        raise ConfigError(f"--init_from_optimizer continues moments of all {stored['block_size']} positions of {path}; "
                          f"drop --block_size {v['block_size']}, or the flag")
    return config


def build_model_config(v):
    if is_checkpoint_file(v["init_from"]):
        return file_model_config(v)
    if v["init_from"]:
        return gpt2_hf.gpt_config(v["init_from"], v["block_size"])
    shape = dict(MODEL_PRESETS[v["model"]])
    for key in ("n_layer", "n_head", "n_embd"):
        if v[key] is not None:
            shape[key] = v[key]
    if shape["n_embd"] % shape["n_head"]:
        raise ConfigError(f"--n_embd {shape['n_embd']} is not divisible by --n_head {shape['n_head']}; pick sizes where it is")
    return GPTConfig(block_size=v["block_size"], **shape)


def build_config(args, dev, ctx, log):
    """The run's configuration from the flags, the quickstart or recipe, the device preset and the
    automatic choices (device settings, loss kernels, micro batch probe): checked, then frozen."""
    resolved = resolve_flags(args, dev.type)
    v = {name: value for name, (value, _) in resolved.items()}
    sources = {name: source for name, (_, source) in resolved.items() if name in LAYERED}
    v["model_source"] = sources["model"]
    if args.resume_from_checkpoint:
        v["resume"], v["checkpoint_path"] = True, args.resume_from_checkpoint
    check_flags(v)
    problem = None
    if ctx.master:  # other machines may not see the folder (distributed.py): rank 0 checks, all ranks stop together
        try:
            check_run_folder(v)
        except cli.UserError as exc:
            problem = exc
    problem = distributed.from_rank0(problem and (type(problem).__name__, str(problem)))
    if problem:
        raise (files.RunLockError if problem[0] == "RunLockError" else ConfigError)(problem[1])
    model_config = build_model_config(v)
    if v["init_from"]:
        v["model"], sources["model"] = v["init_from"], "init_from"
    if v["seq_len"] > model_config.block_size:
        raise ConfigError(f"--seq_len {v['seq_len']} is longer than the model's block size {model_config.block_size}; "
                          f"use --seq_len {model_config.block_size} or less, or raise --block_size")
    dtype = device.resolve_dtype(dev.type, v["dtype"])
    if v["fsdp"] and dtype == "fp16":
        raise ConfigError("--fsdp computes in bf16 or fp32 (fp16 would need a sharded gradient scaler); "
                          "use --dtype bf16 (or fp32), or train without --fsdp")
    for line in device.apply_device_settings(dev.type, v["num_threads"], v["mps_memory_fraction"], v["deterministic"]):
        log(line)
    loss, line = choose_loss(v["fused_loss"], v["loss_chunk_rows"], dev)
    log(line)
    options = dict(activation_checkpointing=v["activation_checkpointing"], loss=loss, loss_chunk_rows=v["loss_chunk_rows"])
    micro_batch_size = v["micro_batch_size"]
    if micro_batch_size == "auto":
        micro_batch_size = probe_micro_batch_size(v, model_config, options, dev, dtype, ctx, log)
        sources["micro_batch_size"] = f"auto ({sources['micro_batch_size']})"
    tokens_per_micro_step = micro_batch_size * v["seq_len"] * ctx.world_size
    if v["total_batch_size"] % tokens_per_micro_step:
        raise ConfigError(
            f"--total_batch_size {v['total_batch_size']} is not a multiple of micro_batch_size * seq_len * world_size = "
            f"{micro_batch_size} * {v['seq_len']} * {ctx.world_size} = {tokens_per_micro_step}; "
            f"use a multiple such as {max(1, v['total_batch_size'] // tokens_per_micro_step) * tokens_per_micro_step}")
    return RunConfig(
        data_root=v["data_root"], log_dir=v["log_dir"], model=v["model"], model_config=model_config,
        init_from=v["init_from"], init_from_optimizer=v["init_from_optimizer"], seed=v["seed"], total_batch_size=v["total_batch_size"],
        micro_batch_size=micro_batch_size, seq_len=v["seq_len"], grad_accum_steps=v["total_batch_size"] // tokens_per_micro_step,
        max_steps=v["max_steps"], warmup_steps=v["warmup_steps"], max_lr=v["max_lr"], min_lr=v["min_lr"],
        weight_decay=v["weight_decay"], grad_clip=v["grad_clip"], device=str(dev), world_size=ctx.world_size,
        preset=v["preset"], dtype=dtype, compile=v["compile"], num_threads=v["num_threads"], pin_memory=v["pin_memory"],
        mps_memory_fraction=v["mps_memory_fraction"], deterministic=v["deterministic"],
        activation_checkpointing=v["activation_checkpointing"], loss=loss,
        loss_chunk_rows=v["loss_chunk_rows"], fused_loss=v["fused_loss"], fsdp=v["fsdp"],
        ddp_bucket_cap_mb=v["ddp_bucket_cap_mb"],
        eval_interval=v["eval_interval"], eval_steps=v["eval_steps"], hellaswag_interval=v["hellaswag_interval"],
        hellaswag_file=v["hellaswag_file"], hellaswag_limit=v["hellaswag_limit"], log_interval=v["log_interval"],
        tensorboard=v["tensorboard"], wandb=v["wandb"], wandb_project=v["wandb_project"],
        wandb_run_name=v["wandb_run_name"] or os.path.basename(os.path.abspath(v["log_dir"])),
        generate_interval=v["generate_interval"], prompt=v["prompt"],
        num_samples=v["num_samples"], max_new_tokens=v["max_new_tokens"], checkpoint_interval=v["checkpoint_interval"],
        auto_resume=v["auto_resume"], start_over=v["start_over"], resume_from=v["checkpoint_path"] if v["resume"] else None,
        keep_last_n_checkpoints=v["keep_last_n_checkpoints"], save_optimizer=v["save_optimizer"],
        async_checkpoint=v["async_checkpoint"], reset_optimizer=v["no_load_optimizer"],
        checkpoint_every_minutes=v["checkpoint_every_minutes"], hang_timeout=v["hang_timeout"],
        sources=tuple(sources.items()))


def probe_micro_batch_size(v, model_config, options, dev, dtype, ctx, log):
    """--micro_batch_size auto: the largest micro batch that fits (the same on every rank); the
    accumulation steps then make up --total_batch_size."""
    seq_len, total = v["seq_len"], v["total_batch_size"]
    sequences_per_rank = total // (seq_len * ctx.world_size)
    if sequences_per_rank < 1 or total % (seq_len * ctx.world_size):
        raise ConfigError(f"--total_batch_size {total} is not a multiple of seq_len * world_size = "
                          f"{seq_len} * {ctx.world_size}; --micro_batch_size auto needs whole sequences per rank")
    micro_batch_size, line = device.auto_micro_batch_size(lambda: GPT(model_config).set_run_options(**options),
                                                          sequences_per_rank * seq_len, seq_len, dev, dtype)
    log(line)
    return micro_batch_size


def print_config(config):
    sources = dict(config.sources)
    rows = [(name, getattr(config, name), source) for name, source in sources.items()]
    rows += [("device", f"{config.device} x {config.world_size}", "derived"), ("precision", config.dtype, "derived"),
             ("grad_accum_steps", config.grad_accum_steps, "derived"), ("loss", config.loss, "derived"),
             ("model_shape", asdict(config.model_config), "derived")]
    width = max(len(name) for name, _, _ in rows)
    print("effective configuration (value, where it came from):")
    for name, value, source in rows:
        print(f"  {name:<{width}}  {value!s:<24} {source}")
