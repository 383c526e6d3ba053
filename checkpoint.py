"""Checkpoint files: their names in a run folder, atomic saves, lean and safe loading, checks, and
what a checkpoint holds besides the weights and the optimizer (TrainState, RandomState).

    load_checkpoint(path) -> dict                      # mmap, weights_only: never runs code (converters.load)
    read_checkpoint(path, for_training=False) -> dict  # any checkpoint file, other trainers' as exports (below)
    verify_file(path) -> dict                          # every byte and tensor, keys and shapes
    load_model(path, device, log) -> (GPT in eval mode, config dict)   # checkpoints and exports alike
    read_weights(path) -> (tensors, model config, the rest of the file)
    summary(ckpt) -> str                               # "nanoGPT checkpoint, 2 steps done, best val loss 3.2500"
    save_file(obj, path)                               # torch.save through files.atomic_write
    step_path, list_checkpoints, read_latest, point_latest, existing_run, move_run_aside
    TrainState()            step, loss history, best validation loss: what the loop records
    RandomState()           every RNG the run draws from, as a stateful object

Every reader here (load_model, verify_file, the tools, --init_from) takes other trainers' files too:
nanoGPT's ckpt.pt, build-nanogpt's model_*.pt and llm.c's .bin, converted by converters.py into an
export of this trainer ('foreign' says what the file is, 'notes' what the conversion chose). Resuming
takes this trainer's checkpoints only. Saving and resuming a run: checkpoint_manager.py. The tools
(list, inspect, verify, export) are scripts/checkpoint_tool.py; `python checkpoint.py ...` forwards to it.

Files in log_dir: model_{step:05d}.pt, model_{step:05d}_epoch{N}.pt (the step where the data ran out
for the N-th time; outside the keep-last-N rotation), latest_checkpoint.pt (symlink, or a small
pointer file where symlinks are impossible), best_model.pt (lowest validation loss the folder has
seen; everything but the optimizer). A checkpoint's `step` is the last completed step; training
resumes at step + 1.
"""
import contextlib
import json
import math
import os
import random
import re
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import environment  # noqa: F401  before torch: it sets variables torch reads when it loads
import numpy as np
import torch

import converters
import files
from cli import UsageError, UserError
from model import config_from_dict, model_from_config

FORMAT_VERSION = 2  # 2: model_config has real_vocab_size and gelu; run_config replaces run_args
CHECKPOINT_PATTERN = re.compile(r"^model_(\d+)(?:_epoch(\d+))?\.pt$")  # group 2: the epoch of an epoch checkpoint
LATEST_NAME = "latest_checkpoint.pt"
BEST_NAME = "best_model.pt"
POINTER_MAGIC = "checkpoint-pointer:"
# What load_model and the commands built on it take (their --checkpoint help).
ANY_FILE = ("model_*.pt, best_model.pt, an export (.pt / .safetensors), or a file of nanoGPT (ckpt.pt), "
            "build-nanogpt (model_*.pt) or llm.c (.bin)")
TIED_WEIGHTS = {"lm_head.weight": "transformer.wte.weight"}  # GPT-2 ties its output and input embeddings
DISK_FULL_HINT = ("Fix: free space there, keep fewer files (--keep_last_n_checkpoints 2), keep the optimizer in the "
                  "newest file only (--save_optimizer latest), or write to another --log_dir; then --auto_resume")


class CheckpointError(UserError):
    """A checkpoint cannot be used or written; the message names the file and the fix."""


# -----------------------------------------------------------------------------
# Files


def step_path(log_dir, step, epoch=None):
    return Path(log_dir) / (f"model_{step:05d}.pt" if epoch is None else f"model_{step:05d}_epoch{epoch}.pt")


def is_epoch_checkpoint(path):
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return bool(match and match.group(2))


def list_checkpoints(log_dir):
    """[(step, path)] of model_*.pt (epoch checkpoints included) in log_dir, oldest first."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        return []
    found = [(int(m.group(1)), log_dir / name) for name in os.listdir(log_dir) if (m := CHECKPOINT_PATTERN.match(name))]
    return sorted(found)


def read_latest(log_dir):
    """The checkpoint latest_checkpoint.pt names, or None."""
    link = Path(log_dir) / LATEST_NAME
    if link.is_symlink():
        return (link.parent / os.readlink(link)).resolve()
    if link.is_file() and link.stat().st_size < 4096:
        text = link.read_text(errors="replace").strip()
        if text.startswith(POINTER_MAGIC):
            return (link.parent / text[len(POINTER_MAGIC):]).resolve()
    return None


def existing_run(log_dir):
    """The newest checkpoint file of a run in log_dir (step checkpoints, best_model.pt), or None."""
    log_dir = Path(log_dir)
    found = [p for _, p in list_checkpoints(log_dir)] + [p for p in (log_dir / BEST_NAME,) if p.is_file()]
    latest = read_latest(log_dir)
    if latest is not None and latest.is_file():
        return latest
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def move_run_aside(log_dir):
    """--start_over: move the run in log_dir (checkpoints, latest, metrics, TensorBoard, failure logs) into a new
    folder log_dir/replaced_<time>, deleting nothing; returns that folder."""
    log_dir = Path(log_dir)
    aside = log_dir / time.strftime("replaced_%Y%m%d-%H%M%S")
    while aside.exists():
        aside = aside.with_name(aside.name + "_")
    aside.mkdir()
    names = [p.name for _, p in list_checkpoints(log_dir)] + [LATEST_NAME, BEST_NAME, "metrics.jsonl", "tensorboard",
                                                               "wandb", "failures"]  # failures/: watchdog.py's logs
    for name in names:
        if (log_dir / name).exists() or (log_dir / name).is_symlink():
            os.replace(log_dir / name, aside / name)
    files.fsync_dir(log_dir)
    return aside


def tensor_bytes(obj):
    """Bytes of the distinct tensors in a nested dict/list: about the size torch.save writes."""
    seen, total = set(), 0
    for t in iter_tensors(obj):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def save_file(obj, path, hint=DISK_FULL_HINT):
    """torch.save through files.atomic_write; a failed write is a CheckpointError (a full disk says so)."""
    try:
        files.atomic_write(path, lambda f: torch.save(obj, f), expected_bytes=tensor_bytes(obj), full_hint=hint)
    except files.WriteError as exc:
        raise CheckpointError(f"{exc}. Older checkpoints are untouched.") from None


def point_latest(log_dir, target):
    """Atomically point latest_checkpoint.pt at target (a file in log_dir)."""
    link = Path(log_dir) / LATEST_NAME
    tmp = files.temp_path(link)
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(Path(target).name, tmp)
    except (OSError, NotImplementedError):
        files.atomic_write(link, lambda f: f.write((POINTER_MAGIC + Path(target).name).encode()))
        return
    os.replace(tmp, link)
    files.fsync_dir(link.parent)


def remove_stale_temp_files(log_dir):
    """Delete temp files of writers that were killed mid-save (their process is gone)."""
    removed = files.remove_stale_temp_files(log_dir)
    if removed:
        print(f"removed {len(removed)} temp file(s) of an interrupted save from {log_dir}: {', '.join(removed)}")


# -----------------------------------------------------------------------------
# Loading and checking


@contextlib.contextmanager
def checkpoint_errors():
    """converters' errors as CheckpointErrors, which every caller here handles (skip the file, report it)."""
    try:
        yield
    except converters.ConverterError as exc:
        raise CheckpointError(str(exc)) from None


def load_checkpoint(path):
    """Load lean and safe (converters.load): memory-mapped on the CPU, so host RAM stays near one
    checkpoint and the GPU never holds a second copy, and weights_only, which refuses any pickle that
    would construct arbitrary objects or run code."""
    with checkpoint_errors():
        return converters.load(path)


def read_checkpoint(path, for_training=False):
    """Any checkpoint file as a dict of this trainer: its checkpoints and exports (.pt, .safetensors) as
    they are; nanoGPT's, build-nanogpt's and llm.c's files (converters) as exports (from_foreign).
    for_training: the weights will be trained on here, so refuse what converters refuses for that."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        tensors, model_config = _read_safetensors(path)
        return {"format_version": FORMAT_VERSION, "kind": "export", "step": None, "model": tensors,
                "model_config": model_config}
    with checkpoint_errors():
        found = converters.read_any(path, for_training)
    return from_foreign(found) if isinstance(found, converters.Foreign) else found


def from_foreign(foreign):
    """Another trainer's file (a converters.Foreign) as an export of this trainer, plus 'foreign' (what the
    file is) and 'notes'. Their step counters count the updates done; ours names the last completed step."""
    return {"format_version": FORMAT_VERSION, "kind": "export", "foreign": converters.KINDS[foreign.kind],
            "step": None if foreign.steps_done is None else foreign.steps_done - 1,
            "val_loss": foreign.val_loss, "best_val_loss": foreign.best_val_loss, "model": foreign.tensors,
            "model_config": foreign.model_config, "optimizer": foreign.optimizer, "run_config": foreign.run_config,
            "notes": list(foreign.notes)}


def summary(ckpt):
    """What a file is, in one phrase: "nanoGPT checkpoint, 2 steps done, best val loss 3.2500"."""
    parts = [ckpt.get("foreign") or f"this trainer's {ckpt.get('kind', 'checkpoint')}"]
    if ckpt.get("step") is not None:
        parts.append(f"{ckpt['step'] + 1} step{'' if ckpt['step'] == 0 else 's'} done")
    for key, name in (("val_loss", "val loss"), ("best_val_loss", "best val loss")):
        if ckpt.get(key) is not None and math.isfinite(ckpt[key]):  # a run never evaluated keeps inf as its best
            parts.append(f"{name} {ckpt[key]:.4f}")
    return ", ".join(parts)


def check_zip_crc(path):
    """Read every byte and compare it with the CRC-32 the zip records for it: catches bit rot and
    torn copies that torch.load with mmap would load silently."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint ({exc})") from None
    if bad is not None:
        raise CheckpointError(f"{path} is corrupt: {bad} does not match its CRC-32 (a damaged copy or disk)")


def stored_config(ckpt, path):
    """The model config dict of a checkpoint, with the fields older files lack filled in."""
    try:
        return vars(config_from_dict(dict(ckpt["model_config"])))
    except UserError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def run_config_of(ckpt):
    """The run's settings as stored: run_config (format 2) or run_args (format 1)."""
    return ckpt.get("run_config") or ckpt.get("run_args") or {}


def not_resumable(path, kind):
    return CheckpointError(f"{path} is another trainer's file ({converters.KINDS[kind]}): it cannot resume a run here. "
                           f"Start a new run from its weights with --init_from {path}")


def verify_checkpoint(ckpt, path, model_config=None, model_keys=None, allow_export=False):
    """Raise CheckpointError unless ckpt has what a resume needs, shaped like this run's model."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint of this trainer")
    foreign = converters.detect(ckpt)
    if foreign:
        raise not_resumable(path, foreign)
    if ckpt.get("kind") == "export" and not allow_export:
        raise CheckpointError(f"{path} is an export (weights and config only): it cannot resume training. "
                              "Resume from a model_*.pt, or use checkpoint.load_model for inference")
    required = ("format_version", "step", "model", "model_config") if ckpt.get("kind") == "export" else \
        ("format_version", "step", "model", "model_config", "dataloader", "rng", "history")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a checkpoint of this trainer")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {ckpt['format_version']}, newer than this code's "
                              f"{FORMAT_VERSION}; update the code (git pull)")
    if model_config is not None:
        stored = stored_config(ckpt, path)
        diffs = [f"{k}={stored.get(k)} in the checkpoint but {v} in this run"
                 for k, v in model_config.items() if stored.get(k) != v]
        if diffs:
            raise CheckpointError(f"{path} was trained with another model shape: {'; '.join(diffs)}. "
                                  "Pass the checkpoint's shape (--model / --n_layer / ...) or use another --log_dir")
    if model_keys is not None:
        for key, shape in model_keys.items():
            if key not in ckpt["model"]:
                if key in TIED_WEIGHTS and TIED_WEIGHTS[key] in ckpt["model"]:
                    continue  # exports drop the tied copy
                raise CheckpointError(f"{path} has no tensor {key}")
            if tuple(ckpt["model"][key].shape) != tuple(shape):
                raise CheckpointError(f"{path}: {key} has shape {tuple(ckpt['model'][key].shape)}, expected {tuple(shape)}")
        unexpected = sorted(set(ckpt["model"]) - set(model_keys))
        if unexpected:
            raise CheckpointError(f"{path} has tensors this model lacks: {', '.join(unexpected[:3])}")


def shapes(model):
    return {k: v.shape for k, v in model.state_dict().items()}


def _meta_model(model_config, path):
    try:
        return model_from_config(model_config, device="meta")
    except UserError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def read_weights(path, for_training=False):
    """(tensors, model_config dict, the file's dict) of any checkpoint file (read_checkpoint's), prefixes
    stripped, tied weights filled, keys and shapes checked against a model of that config."""
    path = Path(path)
    ckpt = read_checkpoint(path, for_training)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path} has no model and model_config: not a checkpoint or export of this trainer, "
                              "nor a file of nanoGPT, build-nanogpt or llm.c")
    tensors, model_config = dict(ckpt["model"]), stored_config(ckpt, path)
    tensors = {converters.WRAPPER_PREFIX.sub("", k): v for k, v in tensors.items()}
    for tied, source in TIED_WEIGHTS.items():
        if tied not in tensors and source in tensors:
            tensors[tied] = tensors[source]
    verify_checkpoint({"format_version": FORMAT_VERSION, "step": 0, "kind": "export", "model": tensors,
                       "model_config": model_config}, path, model_keys=shapes(_meta_model(model_config, path)),
                      allow_export=True)
    return tensors, model_config, ckpt


def to_stderr(line):
    print(line, file=sys.stderr)


def load_model(path, device="cpu", log=to_stderr):
    """(GPT in eval mode on device, model_config dict) from any checkpoint file: this trainer's checkpoints
    and exports, nanoGPT's, build-nanogpt's, llm.c's. For sampling, HellaSwag and the like: what a conversion
    chose goes to log, one line each (stderr: these commands print their results on stdout)."""
    tensors, model_config, ckpt = read_weights(path)
    for note in ckpt.get("notes", ()):
        log(note)
    model = model_from_config(model_config)
    model.load_state_dict(tensors)  # copies, casting bf16/fp16 exports up to the model's fp32
    return model.to(device).eval(), model_config


def _read_safetensors(path):
    safetensors_torch = import_safetensors()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "model_config" not in metadata:
        raise CheckpointError(f"{path} has no model_config in its metadata: not an export of this trainer")
    return safetensors_torch.load_file(str(path)), json.loads(metadata["model_config"])


def import_safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UsageError("the safetensors package is not installed: pip install safetensors, "
                         "or export to a .pt file") from None
    return safetensors.torch


def iter_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v)


def verify_file(path):
    """Read every byte and tensor of any checkpoint file (read_checkpoint's); check structure, keys and shapes
    against a model built from its own model_config, and that weights are finite. Returns the checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if zipfile.is_zipfile(path):
        check_zip_crc(path)
    ckpt = read_checkpoint(path)
    verify_checkpoint(ckpt, path, allow_export=True)
    model = _meta_model(stored_config(ckpt, path), path)
    verify_checkpoint(ckpt, path, model_keys=shapes(model), allow_export=True)
    for name, t in ckpt["model"].items():
        if t.is_floating_point() and not bool(t.isfinite().all()):
            raise CheckpointError(f"{path}: {name} holds NaN or inf")
    for t in iter_tensors(ckpt.get("optimizer")):
        if t.is_floating_point() and not bool(t.isfinite().all()):
            raise CheckpointError(f"{path}: the optimizer state holds NaN or inf")
    return ckpt


# -----------------------------------------------------------------------------
# The state a checkpoint holds besides model and optimizer


@dataclass
class TrainState:
    """What the loop records: the last completed step, the losses so far and the best validation loss."""

    step: int = -1
    val_loss: float = None  # of `step`, when it was evaluated
    best_val_loss: float = float("inf")
    history: dict = field(default_factory=lambda: {"train": [], "val": []})

    def record(self, step, train_loss=None, val_loss=None):
        """This step's losses; True when val_loss is the best so far (NaN never is)."""
        self.step, self.val_loss = step, val_loss
        if train_loss is not None:
            self.history["train"].append([step, train_loss])
        if val_loss is None:
            return False
        self.history["val"].append([step, val_loss])
        improved = val_loss < self.best_val_loss
        if improved:
            self.best_val_loss = val_loss
        return improved

    def keep_best(self, val_loss):
        """A best validation loss from elsewhere (best_model.pt of the folder) that this run must beat."""
        self.best_val_loss = min(self.best_val_loss, val_loss)

    def state_dict(self):
        return {"step": self.step, "val_loss": self.val_loss, "best_val_loss": self.best_val_loss,
                "history": {"train": list(self.history["train"]), "val": list(self.history["val"])}}

    def load_state_dict(self, state):
        self.step, self.val_loss = state["step"], state.get("val_loss")
        self.best_val_loss = state.get("best_val_loss", float("inf"))
        self.history = {"train": [list(x) for x in state["history"]["train"]],
                        "val": [list(x) for x in state["history"]["val"]]}


class RandomState:
    """Every random generator the run draws from (Python, NumPy, torch's CPU, each CUDA device, MPS),
    as plain types and tensors, so weights_only loading accepts it."""

    def __init__(self, log=print):
        self.log = log

    def state_dict(self):
        return capture_rng_state()

    def load_state_dict(self, state):
        skipped = restore_rng_state(state)
        if skipped:
            self.log(f"the checkpoint's {' and '.join(skipped)} random state is not restored: no such device here "
                     f"(the CPU, Python and NumPy streams are)")


def capture_rng_state():
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng_state(state):
    """Every generator the checkpoint holds that this machine has; returns the names of those it
    skipped (a CUDA or MPS run resumed where that device is missing: nothing here draws from them)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "state": {"key": np.array(n["key"], dtype=np.uint32),
                         "pos": n["pos"]}, "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    skipped = []
    if "cuda" in state:
        if torch.cuda.is_available():
            for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)
        else:
            skipped.append("cuda")
    if "mps" in state:
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            torch.mps.set_rng_state(state["mps"])
        else:
            skipped.append("mps")
    return skipped



if __name__ == "__main__":  # the tools live in scripts/checkpoint_tool.py; this keeps `python checkpoint.py ...` working
    import runpy

    runpy.run_path(str(Path(__file__).resolve().parent / "scripts" / "checkpoint_tool.py"), run_name="__main__")
