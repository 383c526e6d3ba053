"""The run configuration: every option of the trainer declared once, as a field of RunConfig (its
flag, type, help and check), and `resolve`, the pure step that turns the command line into one
frozen RunConfig. It is what the trainer prints at start and stores in every checkpoint.

    add_arguments(parser)                          # every RunConfig option as a flag, its default stated once
    config = resolve(args, device_type, world_size, stored=None, found=None)   # pure: no I/O, no torch state
    print_config(config)                           # the table: each value and where it came from
    config.to_dict()                               # plain values (and their sources), for checkpoints

A value comes from, in order: the command line; the checkpoint being resumed (`stored`: its run
configuration, except what belongs to this invocation, and device settings moved to another device
type); the run's table (RUNS: the GPT-2 recipe with --data_root, else the device's quickstart); the
device preset (PRESETS); the field's default. `found` holds what the trainer's setup measured
or read (the micro batch that fits, the precision and loss kernel this device has, the model shape of
--init_from): resolve only decides, so it is tested without a device.
"""
import argparse
import math
import os
from dataclasses import asdict, dataclass, field, fields

import cli
from device import COMPILE_MODES, DEVICE_CHOICES, DEVICE_HELP, DTYPE_CHOICES, DTYPE_HELP, PRESETS
from model import GPTConfig, MODEL_PRESETS
from optimizers import MUON_LR, MUON_MOMENTUM, OPTIMIZERS

DEFAULT_DATA_ROOT = os.path.join("data", "tinyshakespeare")
DDP_BUCKET_CAP_MB = 25.0  # PyTorch's default all-reduce bucket size; --ddp_bucket_cap_mb

# Per-run defaults. The recipe: GPT-2 124M on FineWeb-Edu 10B tokens (build-nanogpt's, llm.c's), taken
# when --data_root is given. Without it, the quickstart: tiny Shakespeare, sized so a first run shows the
# loss fall and a sample in minutes (docs/RESULTS.md has the runs these were chosen from).
RUNS = {
    "recipe": dict(model="gpt2", seq_len=1024, total_batch_size=524288, max_steps=19073, warmup_steps=715,
                   max_lr=6e-4, min_lr=6e-5, eval_interval=250, eval_steps=20, checkpoint_interval=5000),
    # compile off: 300 eager steps of GPT-2 take less time than compiling it
    "quickstart:cuda": dict(model="gpt2", seq_len=1024, micro_batch_size=16, total_batch_size=16384, max_steps=300,
                            warmup_steps=30, max_lr=6e-4, min_lr=6e-5, eval_interval=50, eval_steps=2,
                            checkpoint_interval=300, compile="none"),
    "quickstart:mps": dict(model="d6", seq_len=256, micro_batch_size=16, total_batch_size=4096, max_steps=500,
                           warmup_steps=30, max_lr=1e-3, min_lr=1e-4, eval_interval=50, eval_steps=4,
                           checkpoint_interval=500),
    # LR 1e-3 -> 2e-4: higher spiked the loss, lower ended worse (docs/RESULTS.md)
    "quickstart:cpu": dict(model="d4", seq_len=64, micro_batch_size=8, total_batch_size=512, max_steps=300,
                           warmup_steps=20, max_lr=1e-3, min_lr=2e-4, eval_interval=50, eval_steps=4,
                           checkpoint_interval=300),
}

# What a resume does with a stored value (field metadata "kind"):
#   run        restored from the checkpoint unless given; a given change applies, with one line
#   fixed      restored; a given change is refused: it would make another run (model shape, sequence length)
#   device     restored on the same device type only; elsewhere chosen afresh for this device
#   invocation never restored: what this command does (resume how, from where), not what the run is


class ConfigError(cli.UserError):
    """A flag, or a combination of flags, that cannot work; the message names the flag and the fix."""


def option(default=None, help="", *, kind="run", type=str, check=None, aliases=(), **argparse_kwargs):
    """A RunConfig field that is also a flag. check: (allowed(value) -> bool, what to use instead)."""
    return field(default=default, metadata=dict(help=help, kind=kind, type=type, check=check, aliases=aliases,
                                                argparse=argparse_kwargs))


def derived(default=None):
    """A RunConfig field that no flag sets: the setup's choice, or a consequence of other values."""
    return field(default=default, metadata=dict(kind="derived"))


def at_least(low, instead):
    return (lambda v: v is None or v >= low), instead


def finite_at_least(low, instead):
    return (lambda v: v is None or math.isfinite(v) and v >= low), instead


def micro_batch_size_arg(text):
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive number of sequences nor auto")
    return int(text)


def compile_arg(text):
    """--compile MODE, and the spellings of nanoGPT's users: --compile=False (eager), --compile=True (default)."""
    flag = cli.boolean_or_none(text)
    if flag is not None:
        return "default" if flag else "none"
    if text not in COMPILE_MODES + ("none",):
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(COMPILE_MODES)}, none, True, False")
    return text


SHAPE = ("model", "n_layer", "n_head", "n_embd", "block_size")


@dataclass(frozen=True)
class RunConfig:
    # -- data and output
    data_root: str = option(DEFAULT_DATA_ROOT, "folder of token shards (<name>_{train,val}_NNNNNN.npy, uint16; "
                                               f"default: {DEFAULT_DATA_ROOT}, prepared on first use, with the "
                                               "quickstart's settings; giving it switches the defaults to the GPT-2 "
                                               "recipe)", metavar="DIR")
    log_dir: str = option("log", "where metrics.jsonl and the checkpoints are written", kind="invocation",
                          metavar="DIR")
    # -- model
    model: str = option(None, "model preset", kind="fixed", choices=sorted(MODEL_PRESETS))
    n_layer: int = option(None, "layers (default: the preset's)", kind="fixed", type=int, check=at_least(1, "1 or more"))
    n_head: int = option(None, "attention heads (default: the preset's)", kind="fixed", type=int,
                         check=at_least(1, "1 or more"))
    n_embd: int = option(None, "width (default: the preset's)", kind="fixed", type=int, check=at_least(1, "1 or more"))
    block_size: int = option(1024, "longest sequence the model can take (its position table), tokens", kind="fixed",
                             type=int, check=at_least(1, "a number of positions above 0, e.g. 1024"))
    init_from: str = option(None, "start a new run (step 0) from pretrained weights: gpt2, gpt2-medium, gpt2-large, "
                                  "gpt2-xl (OpenAI's, via pip install transformers), a save_pretrained folder, or a "
                                  "checkpoint file: this trainer's, nanoGPT's ckpt.pt, build-nanogpt's model_*.pt, "
                                  "llm.c's .bin; they set the model shape", kind="invocation",
                            metavar="NAME|DIR|FILE")
    init_from_optimizer: bool = option(False, "with --init_from FILE: continue the file's AdamW moments and step "
                                              "counts too (nanoGPT's ckpt.pt and this trainer's checkpoints hold "
                                              "them), with this run's learning rate, betas and weight decay",
                                       kind="invocation", type=bool)
    # -- batch and schedule
    total_batch_size: int = option(None, "tokens per optimizer step over all ranks", type=int,
                                   check=at_least(1, "a number of tokens above 0, e.g. 524288"))
    micro_batch_size: object = option(None, "sequences per forward pass per rank, or auto: the largest that fits "
                                            "the GPU, probed at start", kind="device", type=micro_batch_size_arg)
    seq_len: int = option(None, "tokens per sequence", kind="fixed", type=int,
                          check=at_least(1, "a number of tokens above 0, e.g. 1024"))
    max_steps: int = option(None, "optimizer steps in the run", type=int, check=at_least(1, "at least 1"))
    warmup_steps: int = option(None, "linear LR warm-up, steps; 0: none", type=int,
                               check=at_least(0, "0 (no warm-up) or more"))
    max_lr: float = option(None, "peak learning rate", type=float,
                           check=finite_at_least(0, "a finite learning rate, 0 or more, e.g. 6e-4"))
    min_lr: float = option(None, "final learning rate of the cosine decay; a default above --max_lr becomes "
                                 "max_lr/10", type=float,
                           check=finite_at_least(0, "a finite learning rate of 0 or more, e.g. max_lr / 10"))
    weight_decay: float = option(0.1, "AdamW weight decay on 2-D weights (with --optimizer muon: on the embeddings)",
                                 type=float, check=finite_at_least(0, "0 (no decay) or more, e.g. 0.1"))
    optimizer: str = option("adamw", "adamw: AdamW over every parameter (the GPT-2 recipe); muon: torch.optim.Muon for "
                                     "the blocks' attention and MLP matrices at --muon_lr, AdamW at --max_lr for the "
                                     "embeddings, biases and layer norms; the LR schedule scales both "
                                     "(docs/PERFORMANCE.md compares them)", choices=list(OPTIMIZERS))
    muon_lr: float = option(MUON_LR, "--optimizer muon: peak LR of the block matrices (Muon's step is scaled by "
                                     "sqrt(max(1, rows/cols)))", type=float,
                            check=finite_at_least(0, "a finite learning rate, 0 or more, e.g. 0.01"))
    muon_momentum: float = option(MUON_MOMENTUM, "--optimizer muon: Muon's Nesterov momentum", type=float,
                                  check=(lambda v: math.isfinite(v) and 0 <= v < 1, "a momentum in [0, 1), e.g. 0.95"))
    muon_weight_decay: float = option(0.0, "--optimizer muon: decoupled weight decay of the block matrices, per unit "
                                           "of Muon's LR", type=float,
                                      check=finite_at_least(0, "0 (no decay) or more"))
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0 disables", type=float,
                              check=finite_at_least(0, "0 (no clipping) or a norm above 0, e.g. 1.0"))
    seed: int = option(1337, "seed for the initial weights, the samples and the --shuffle order", type=int)
    shuffle: bool = option(False, "read the windows in a seeded order, new each epoch (and the shards), the same for "
                                  "any world size and exactly resumable; off: in order, as build-nanogpt reads them",
                           kind="fixed", type=bool)
    # -- device
    preset: str = option("auto", "per-device defaults for micro batch, dtype, compile, pin_memory (auto: the "
                                 "device's; python device.py shows them); flags win", kind="device",
                         choices=DEVICE_CHOICES)
    device: str = option("auto", DEVICE_HELP, kind="invocation", choices=DEVICE_CHOICES)
    dtype: str = option(None, DTYPE_HELP, kind="device", choices=DTYPE_CHOICES)
    compile: str = option(None, "torch.compile the model; optional mode: default, reduce-overhead, max-autotune, "
                                "max-autotune-no-cudagraphs, none (=False). A mode that fails falls back to "
                                "default, then eager", kind="device", type=compile_arg, nargs="?", const="default",
                          metavar="MODE")
    num_threads: int = option(None, "CPU threads for torch (default: torch's choice, one per physical core)",
                              kind="device", type=int, check=at_least(1, "1 or more threads"))
    pin_memory: bool = option(None, "page-locked host batches for faster, asynchronous copies to the GPU",
                              kind="device", type=bool)
    mps_memory_fraction: float = option(
        None, "Apple MPS: cap this process at this fraction of the GPU's recommended working set, 0..2 (default: "
              "PYTORCH_MPS_HIGH_WATERMARK_RATIO, 1.0 unless you set it)", kind="device", type=float,
        check=(lambda v: v is None or (math.isfinite(v) and 0 <= v <= 2),
               "a fraction of the recommended working set in 0..2, e.g. 0.8"))
    deterministic: bool = option(False, "bit-identical runs and resumes on CUDA too (the CPU already is): "
                                        "deterministic kernels everywhere, at a cost in speed (docs/DETERMINISM.md)",
                                 type=bool)
    activation_checkpointing: bool = option(False, "recompute activations in the backward pass: ~1/3 more compute, "
                                                   "far less memory", kind="device", type=bool)
    loss_chunk_rows: int = option(0, "compute the loss ROWS token positions at a time, never holding all B*T x vocab "
                                     "logits, where --fused_loss cannot run (docs/PERFORMANCE.md); 0: off, try 8192",
                                  kind="device", type=int, metavar="ROWS",
                                  check=at_least(0, "0 (off) or a row count such as 8192"))
    fsdp: bool = option(False, "shard the weights, gradients and AdamW state over the ranks (FSDP2; each holds 1/N) "
                               "for models one GPU cannot hold; bf16 compute through FSDP's mixed precision. With "
                               "torchrun, or alone as a group of one. Checkpoints stay single files", kind="device",
                        type=bool)
    ddp_bucket_cap_mb: float = option(DDP_BUCKET_CAP_MB, "DDP: gradient MB per all-reduce bucket (PyTorch's default)",
                                      kind="device", type=float, metavar="MB",
                                      check=(lambda v: math.isfinite(v) and v > 0, "PyTorch's 25, or a size such as 100"))
    fused_loss: str = option("auto", "the loss in Triton kernels whose gradient overwrites the logits (auto: on for "
                                     "CUDA with Triton, unless --loss_chunk_rows is set)", kind="device",
                             choices=["auto", "on", "off"])
    # -- evaluation and logging
    eval_interval: int = option(None, "validation loss every N steps, and at the last step; 0: at the last step only",
                                type=int, check=at_least(0, "0 (at the last step only) or more"))
    eval_steps: int = option(None, "validation batches of --total_batch_size tokens each, the same tokens at any "
                                   "world size", type=int, check=at_least(1, "1 or more batches"))
    hellaswag_interval: int = option(0, "HellaSwag accuracy every N steps and at the last step; 0: off", type=int,
                                     check=at_least(0, "0 (off) or more"))
    hellaswag_file: str = option(None, "local hellaswag_val.jsonl (default: download it once into "
                                       "$HELLASWAG_CACHE_DIR or ~/.cache/gpt2-train/hellaswag)", metavar="FILE")
    hellaswag_limit: int = option(None, "score only the first N HellaSwag examples (default: all)", type=int,
                                  check=at_least(1, "1 or more"))
    log_interval: int = option(1, "print a step line (and time data/fwd/bwd/optim) every N steps; metrics.jsonl "
                                     "gets every step", type=int, check=at_least(1, "1 or more"))
    tensorboard: bool = option(False, "also write the metrics to <log_dir>/tensorboard (pip install tensorboard)",
                               type=bool)
    wandb: bool = option(False, "also log to Weights & Biases, rank 0 only (pip install wandb; WANDB_MODE=offline "
                                "works without a network); --auto_resume continues the same W&B run", type=bool)
    wandb_project: str = option("gpt2-train", "W&B project")
    wandb_run_name: str = option(None, "W&B run name (default: the --log_dir folder's name)")
    generate_interval: int = option(0, "print samples every N steps; 0: only at the end", type=int,
                                    check=at_least(0, "0 (at the end only) or more"))
    prompt: str = option("\n", "prompt for samples (default: a newline)")
    num_samples: int = option(2, "samples printed each time", type=int, check=at_least(1, "1 or more"))
    max_new_tokens: int = option(64, "tokens per sample", type=int, check=at_least(1, "1 or more"))
    # -- checkpoints
    checkpoint_interval: int = option(None, "save every N steps and at the last step; 0: only at the end", type=int,
                                      check=at_least(0, "0 (at the last step only) or a number of steps"))
    auto_resume: bool = option(False, "resume from the newest valid checkpoint in --log_dir if there is one",
                               kind="invocation", type=bool)
    start_over: bool = option(False, "train from step 0 in a --log_dir that holds a run: its files are moved into "
                                     "<log_dir>/replaced_<time>/ first, nothing is deleted (without this flag, or "
                                     "--auto_resume, such a folder is refused)", kind="invocation", type=bool)
    resume: bool = option(False, "resume from --resume_from_checkpoint PATH (alias --checkpoint_path)",
                          kind="invocation", type=bool)
    resume_from_checkpoint: str = option(None, "resume from exactly this checkpoint file", kind="invocation",
                                         aliases=("--checkpoint_path",), metavar="PATH")
    keep_last_n_checkpoints: int = option(-1, "delete older step checkpoints beyond N; -1 keeps all", type=int,
                                          check=(lambda v: v == -1 or v >= 1, "-1 (keep all) or 1 or more"))
    save_optimizer: str = option("all", "optimizer state in every checkpoint, or only the newest (older ones keep "
                                        "weights only)", choices=["all", "latest"])
    async_checkpoint: bool = option(False, "write checkpoints in a background thread", type=bool)
    reset_optimizer: bool = option(False, "resume the weights only, with a fresh optimizer (fine-tuning, a changed "
                                          "learning rate)", kind="invocation", type=bool,
                                   aliases=("--no_load_optimizer",))
    checkpoint_every_minutes: float = option(0.0, "also save every M minutes of wall time (rank 0's clock decides "
                                                  "for every rank); 0: off", type=float, metavar="M",
                                             check=finite_at_least(0, "0 (off) or a number of minutes, e.g. 30"))
    # -- faults
    hang_timeout: float = option(None, "seconds without progress (a step, an evaluation batch, a save) before a "
                                       "rank dumps every thread's stack and exits, so torchrun restarts the group "
                                       "(watchdog.py); 0: off", kind="device", type=float, metavar="SECONDS",
                                 check=finite_at_least(0, "0 (off) or a number of seconds, e.g. 900"))
    # -- derived: what the setup found, and consequences of the values above
    model_config: GPTConfig = derived()
    world_size: int = derived(1)
    grad_accum_steps: int = derived()
    loss: str = derived()  # model.LOSSES
    init_from_transformers: bool = derived(False)  # --init_from NAME|DIR (OpenAI's weights), not a file
    sources: tuple = derived(())  # (name, where its value came from), for the table and checkpoints
    notes: tuple = derived(())  # one line each for the user: what a resume changed, ignored or chose afresh

    def to_dict(self):
        """Plain values for checkpoints (weights_only loading accepts them), with where each came from."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("sources", "model_config")}
        return dict(d, model_config=asdict(self.model_config), sources=dict(self.sources))


OPTIONS = [f for f in fields(RunConfig) if f.metadata["kind"] != "derived"]
BY_NAME = {f.name: f for f in OPTIONS}


# -----------------------------------------------------------------------------
# The command line


def describe_default(f):
    """Where an option's default comes from, in the words --help uses: the tables, so help cannot drift."""
    runs = {name: table[f.name] for name, table in RUNS.items() if f.name in table}
    presets = {name: table[f.name] for name, table in PRESETS.items() if f.name in table}
    parts = []
    if "recipe" in runs:
        parts.append(f"{runs.pop('recipe')} with --data_root (the recipe)")
    if runs:
        parts.append("quickstart: " + ", ".join(f"{name.split(':')[1]} {value}" for name, value in runs.items()))
    if presets:
        parts.append(("else " if parts else "") + "the device preset's: "
                     + ", ".join(f"{name} {value}" for name, value in presets.items()))
    if not parts and f.default is not None and not isinstance(f.default, bool) and "default" not in f.metadata["help"]:
        parts.append(str(f.default))
    return f" (default: {'; '.join(parts)})" if parts else ""


def add_arguments(parser):
    """Every option as a flag whose dest is its RunConfig field. Every default is None here, so that a flag
    the user gave can be told from one they did not; the help states the real default from the tables."""
    for f in OPTIONS:
        if f.name in GROUP_STARTS:
            group = parser.add_argument_group(GROUP_STARTS[f.name])
        meta = f.metadata
        kwargs = dict(meta["argparse"], type=meta["type"])
        if meta["type"] is bool:
            kwargs.update(nargs="?", const=True, type=cli.boolean, metavar="BOOL")
        group.add_argument(f"--{f.name}", *meta["aliases"], dest=f.name, default=None,
                           help=meta["help"] + describe_default(f), **kwargs)
        if meta["type"] is bool:  # --no_pin_memory and the like
            group.add_argument(f"--no_{f.name}", dest=f.name, action="store_const", const=False, default=None,
                               help=argparse.SUPPRESS)


# --help's sections, each named at its first option; the options after it (RunConfig's order) belong to it.
GROUP_STARTS = {"data_root": "data and output", "model": "model", "total_batch_size": "batch and schedule",
                "preset": "device", "eval_interval": "evaluation and logging",
                "checkpoint_interval": "checkpoints", "hang_timeout": "faults"}


# -----------------------------------------------------------------------------
# The pure configuration step


def resolve(args, device_type, world_size=1, stored=None, found=None, before_resume=False):
    """The RunConfig of a command line (argparse's namespace from add_arguments: None = not given) on
    device_type with world_size ranks. stored: the run configuration of the checkpoint this run resumes
    (a to_dict()), or None. found: what the setup measured or read ({"dtype", "loss", "micro_batch_size",
    "model_config"}); without it those keep what was asked for ("auto") and the batch is not yet checked.
    before_resume: a call before the checkpoint of a resuming command is read, whose settings decide the
    sequence and the batch: their fit is checked on the call with stored.
    Does no I/O, runs no collective and touches no torch state. Raises ConfigError naming the fix."""
    found = found or {}
    flags = {name: value for name, value in vars(args).items() if name in BY_NAME and value is not None}
    config_values = dict(getattr(args, "config_values", None) or {})
    given = {**config_values, **flags}  # what a config file says is asked for as a flag is: a resume checks it
    stored_values, stored_sources = dict(stored or {}), dict((stored or {}).get("sources") or {})
    same_device = str(stored_values.get("device", "")).split(":")[0] == device_type
    quickstart = "data_root" not in given and (stored is None or stored_sources.get("data_root", "flag") == "default"
                                               and stored_values.get("data_root") in (None, DEFAULT_DATA_ROOT))
    run_table = f"quickstart:{device_type}" if quickstart else "recipe"
    preset = given.get("preset") or (stored_values.get("preset") if stored and same_device else None) or "auto"
    preset = device_type if preset == "auto" else preset
    layers = [("flag", flags), (f"config:{getattr(args, 'config', None)}", config_values)]
    if stored is not None:
        restorable = {"run", "fixed"} | ({"device"} if same_device else set())
        layers.append(("checkpoint", {name: value for name, value in stored_values.items()
                                      if name in BY_NAME and BY_NAME[name].metadata["kind"] in restorable}))
    layers += [(run_table, RUNS[run_table]), (f"preset:{preset}", PRESETS[preset])]
    values, sources = {}, {}
    for f in OPTIONS:
        values[f.name], sources[f.name] = f.default, "default"
        for source, layer in layers:
            if f.name in layer and layer[f.name] is not None:
                values[f.name], sources[f.name] = layer[f.name], source
                break
    values["preset"] = preset
    if values["min_lr"] > values["max_lr"] and sources["min_lr"] not in ("flag", "checkpoint"):
        values["min_lr"], sources["min_lr"] = values["max_lr"] * 0.1, "max_lr/10"  # a table's min_lr above --max_lr
    if values["wandb_run_name"] is None:
        values["wandb_run_name"] = os.path.basename(os.path.abspath(values["log_dir"]))
    if values["resume_from_checkpoint"]:
        values["resume"] = True
    check(values, given)
    notes = ()
    if stored is not None:
        check_changes(values, given, stored_values)
        notes = resume_notes(values, given, stored_values, device_type, same_device)
    stored_shape = stored_values.get("model_config")
    model_config = found.get("model_config") or (stored_shape and GPTConfig(**stored_shape)) or shape_of(values)
    if values["init_from"] and stored is None:
        values["model"], sources["model"] = values["init_from"], "init_from"
    elif values["init_from"]:  # the run it started is resumed: its weights come from its checkpoint
        values["init_from"], values["init_from_optimizer"] = None, False
    # Before a resume's checkpoint is read, the sequence and the batch are the tables', not the run's: not judged.
    known = not (before_resume and (values["auto_resume"] or values["resume"]))
    if known and values["seq_len"] > model_config.block_size:
        raise ConfigError(f"--seq_len {values['seq_len']} is longer than the model's block size "
                          f"{model_config.block_size}; use --seq_len {model_config.block_size} or less, or raise "
                          "--block_size")
    sequences = values["seq_len"] * world_size
    if known and values["micro_batch_size"] == "auto" and values["total_batch_size"] % sequences:
        raise ConfigError(f"--total_batch_size {values['total_batch_size']} is not a multiple of seq_len * world_size = "
                          f"{values['seq_len']} * {world_size}; --micro_batch_size auto needs whole sequences per rank")
    for name in ("dtype", "micro_batch_size"):
        if found.get(name) is not None:
            if name == "micro_batch_size" and values[name] == "auto":
                sources[name] = f"auto ({sources[name]})"
            values[name] = found[name]
    if values["fsdp"] and values["dtype"] == "fp16":
        raise ConfigError("--fsdp computes in bf16 or fp32 (fp16 would need a sharded gradient scaler); "
                          "use --dtype bf16 (or fp32), or train without --fsdp")
    grad_accum_steps = None
    if known and values["micro_batch_size"] != "auto":
        fitted = fit_micro_batch(values, sources["micro_batch_size"], world_size)
        if fitted != values["micro_batch_size"]:
            notes += (f"micro_batch_size {values['micro_batch_size']} ({sources['micro_batch_size']}) does not fit "
                      f"{values['total_batch_size']} tokens a step over {world_size} ranks: {fitted} sequences a rank",)
            values["micro_batch_size"], sources["micro_batch_size"] = fitted, f"fitted ({sources['micro_batch_size']})"
        tokens_per_micro_step = values["micro_batch_size"] * values["seq_len"] * world_size
        if values["total_batch_size"] % tokens_per_micro_step:
            suggestion = max(1, values["total_batch_size"] // tokens_per_micro_step) * tokens_per_micro_step
            raise ConfigError(
                f"--total_batch_size {values['total_batch_size']} is not a multiple of micro_batch_size * seq_len * "
                f"world_size = {values['micro_batch_size']} * {values['seq_len']} * {world_size} = "
                f"{tokens_per_micro_step}; use a multiple such as {suggestion}")
        grad_accum_steps = values["total_batch_size"] // tokens_per_micro_step
    return RunConfig(**{**values, "device": device_type}, model_config=model_config, world_size=world_size,
                     grad_accum_steps=grad_accum_steps, loss=found.get("loss"),
                     init_from_transformers=bool(found.get("init_from_transformers")), sources=tuple(sources.items()),
                     notes=notes)


def check(values, given):
    """One ConfigError line for the first option (or combination) that cannot work."""
    for f in OPTIONS:
        rule = f.metadata["check"]
        if rule is not None and not rule[0](values[f.name]):
            raise ConfigError(f"--{f.name} {values[f.name]} cannot work: use {rule[1]}")
    if values["min_lr"] > values["max_lr"]:
        raise ConfigError(f"--min_lr {values['min_lr']} is above --max_lr {values['max_lr']}: the schedule decays from "
                          "max_lr to min_lr; lower --min_lr")
    if values["resume"] and not values["resume_from_checkpoint"]:
        raise ConfigError("--resume needs --checkpoint_path PATH (or use --resume_from_checkpoint PATH, or --auto_resume)")
    if values["init_from"] and any(name in given for name in SHAPE if name != "block_size"):
        raise ConfigError("--init_from takes the model shape from the weights; drop --model, --n_layer, --n_head and "
                          "--n_embd")
    if values["start_over"] and (values["auto_resume"] or values["resume"]):
        raise ConfigError("--start_over begins a new run; it cannot also resume (--auto_resume, --resume): drop one")
    if values["init_from_optimizer"] and not values["init_from"]:
        raise ConfigError(INIT_FROM_OPTIMIZER_NEEDS_A_FILE)


def check_changes(values, given, stored):
    """A resume that was given another model shape, sequence length or reading order than the checkpoint's is
    another run: refused, naming what the checkpoint has."""
    changed = [f"--{name} {value} (the checkpoint has {stored.get(name, BY_NAME[name].default)})"
               for name, value in given.items() if BY_NAME[name].metadata["kind"] == "fixed" and name not in SHAPE
               and value != stored.get(name, BY_NAME[name].default)]
    if any(name in given for name in SHAPE) and stored.get("model_config"):
        shape = dict(stored["model_config"], **(MODEL_PRESETS[given["model"]] if "model" in given else {}))
        shape.update({name: given[name] for name in SHAPE[1:] if name in given})
        changed += [f"--{name} {shape[name]} (the checkpoint has {stored['model_config'][name]})"
                    for name in SHAPE[1:] if shape[name] != stored["model_config"][name]]
    old = stored.get("optimizer", "adamw")
    if given.get("optimizer", old) != old and not values["reset_optimizer"]:
        raise ConfigError(f"the checkpoint's run was trained with --optimizer {old}: drop --optimizer "
                          f"{given['optimizer']} to continue it, or pass --reset_optimizer to continue its weights with "
                          f"a fresh {given['optimizer']}")
    if changed:
        raise ConfigError(f"resuming {values['log_dir']} with {', '.join(changed)} would train another run: drop "
                          "those flags to continue this one, or start a new run from its weights in another "
                          "--log_dir with --init_from CHECKPOINT")


INIT_FROM_OPTIMIZER_NEEDS_A_FILE = ("--init_from_optimizer needs --init_from FILE, a checkpoint file holding an "
                                    "optimizer state (nanoGPT's ckpt.pt, this trainer's model_*.pt); drop it, or name "
                                    "such a file")


def fit_micro_batch(values, source, world_size):
    """The micro batch to use: as given where the user chose it (a flag or a config file); where a table or
    the checkpoint chose it, the largest at or below it that divides the step's tokens over world_size
    ranks (the quickstart's, under torchrun; a resume on another number of ranks), so the run keeps its
    batch. Unchanged where nothing fits: the caller's check names the fix."""
    micro, per_sequence = values["micro_batch_size"], values["seq_len"] * world_size
    if source == "flag" or source.startswith("config:"):
        return micro
    return next((m for m in range(micro, 0, -1) if values["total_batch_size"] % (m * per_sequence) == 0), micro)


def resume_notes(values, given, stored, device_type, same_device):
    """One line for each setting a resume does not take from the checkpoint."""
    notes = []
    for name, value in given.items():
        kind, old = BY_NAME[name].metadata["kind"], stored.get(name)
        if kind in ("run", "device") and name in stored and old != value and (kind == "run" or same_device):
            why = {"max_steps": ": the LR schedule is recomputed from the next step",
                   "deterministic": (": the steps from here on repeat bit for bit, not the run before" if value else
                                     ": the steps from here on no longer repeat bit for bit on CUDA")}.get(name, "")
            notes.append(f"resume: --{name} {value}, where the checkpoint's run had {old}{why}")
    if given.get("init_from"):
        notes.append(f"resume: --init_from {given['init_from']} ignored: the run it started continues from its "
                     "checkpoint (a new run from those weights needs another --log_dir)")
    if not same_device and stored.get("device"):
        notes.append(f"resume: the checkpoint's run was on {stored['device']}: micro batch, precision, compile and "
                     f"the other device settings are chosen afresh for {device_type}")
    return tuple(notes)


def shape_of(values):
    """The GPTConfig of the preset and the shape flags (--init_from's shape comes in found instead)."""
    shape = dict(MODEL_PRESETS[values["model"]])
    shape.update({key: values[key] for key in ("n_layer", "n_head", "n_embd") if values[key] is not None})
    if shape["n_embd"] % shape["n_head"]:
        raise ConfigError(f"--n_embd {shape['n_embd']} is not divisible by --n_head {shape['n_head']}; pick sizes "
                          "where it is")
    return GPTConfig(block_size=values["block_size"], **shape)


def print_config(config):
    """The table printed at start: every value that is not a plain default, and where it came from."""
    rows = [(name, getattr(config, name), source) for name, source in config.sources
            if (source != "default" or name in TABLED or name in ("weight_decay", "grad_clip", "optimizer")
                or name.startswith("muon_") and config.optimizer == "muon") and name != "device"]
    rows += [("device", f"{config.device} x {config.world_size}", "derived"), ("precision", config.dtype, "derived"),
             ("grad_accum_steps", config.grad_accum_steps, "derived"), ("loss", config.loss, "derived"),
             ("model_shape", asdict(config.model_config), "derived")]
    width = max(len(name) for name, _, _ in rows)
    cli.log("effective configuration (value, where it came from):")
    for name, value, source in rows:
        cli.log(f"  {name:<{width}}  {value!s:<24} {source}")


TABLED = {name for table in list(RUNS.values()) + list(PRESETS.values()) for name in table}
