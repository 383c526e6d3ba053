"""Checkpoint files: their layout, their names in a run folder, atomic saves, lean and safe loading,
checks, and the tools' way in (read_checkpoint, verify_file, load_model).

    load_checkpoint(path) -> dict                      # mmap, weights_only: never runs code; migrated to this layout
    read_checkpoint(path, for_training=False) -> dict  # any checkpoint file, other trainers' as exports (below)
    read_foreign(path, for_training=False) -> converters.Foreign or None   # another trainer's file, converted
    verify_file(path) -> dict                          # every byte and tensor, keys and shapes
    load_model(path, device) -> (GPT in eval mode, config dict)   # checkpoints and exports alike
    read_weights(path) -> (tensors, model config, the rest of the file)
    summary(ckpt) -> str                               # "nanoGPT checkpoint, 2 steps done, best val loss 3.2500"
    save_file(obj, path)                               # torch.save through files.atomic_write
    step_path, list_checkpoints, read_latest, point_latest     names in a run folder (run_folder.py: what they mean)
The training state's own parts (TrainState, RandomState) are run_state.py.

Every reader here (load_model, verify_file, the tools, --init_from) takes other trainers' files too:
nanoGPT's ckpt.pt, build-nanogpt's model_*.pt and llm.c's .bin, converted by converters.py into an
export of this trainer ('foreign' says what the file is, 'notes' what the conversion chose). Resuming
takes this trainer's checkpoints only. Saving and resuming a run: checkpoint_manager.py. The tools
(list, compare, prune, inspect, verify, export) are scripts/checkpoint_tool.py; `python checkpoint.py ...` forwards to it.

Files in log_dir: model_{step:05d}.pt, model_{step:05d}_epoch{N}.pt (the step where the data ran out
for the N-th time; outside the keep-last-N rotation), latest_checkpoint.pt (symlink, or a small
pointer file where symlinks are impossible), best_model.pt (lowest validation loss the folder has
seen; everything but the optimizer). A checkpoint's `step` is the last completed step; training
resumes at step + 1.
"""
import json
import math
import os
import pickle
import re
import zipfile
from pathlib import Path

import environment  # noqa: F401  before torch: it sets variables torch reads when it loads
import torch

import converters
import files
from cli import UsageError, UserError, log
from model import TIED_WEIGHTS, ModelConfigError, config_from_dict, model_from_config

# The layout, format 3. A checkpoint file is one dict:
#   format_version  this layout's number (migrate() reads the older ones)
#   kind            "checkpoint" (resumable) or "export" (weights and model_config only)
#   torch_version   the torch that wrote it
#   PARTS           the state_dict() of each stateful object the manager is handed, under its name: model (no
#                   DDP / compile prefixes), optimizer (torch.optim's format, keyed by parameter index), scaler,
#                   dataloader, rng (RandomState), train_state (TrainState: step, losses, best val loss), tracking
#   model_config    GPTConfig's fields; run_config: RunConfig.to_dict(), with each value's source; world_size
# A step is the last completed step: training resumes at train_state["step"] + 1.
FORMAT_VERSION = 3  # 2: model_config has real_vocab_size and gelu, run_config replaces run_args; 3: train_state
PARTS = ("model", "optimizer", "scaler", "dataloader", "rng", "train_state", "tracking")
REQUIRED = {"checkpoint": ("format_version", "kind", "model", "model_config", "dataloader", "rng", "train_state"),
            "export": ("format_version", "kind", "model", "model_config")}
CHECKPOINT_PATTERN = re.compile(r"^model_(\d+)(?:_epoch(\d+))?\.pt$")  # group 2: the epoch of an epoch checkpoint
LATEST_NAME = "latest_checkpoint.pt"
BEST_NAME = "best_model.pt"
POINTER_MAGIC = "checkpoint-pointer:"
# What load_model and the commands built on it take (their --checkpoint help).
ANY_FILE = ("model_*.pt, best_model.pt, an export (.pt / .safetensors), or a file of nanoGPT (ckpt.pt), "
            "build-nanogpt (model_*.pt) or llm.c (.bin)")
DISK_FULL_HINT = ("Fix: free space there, keep fewer files (--keep_last_n_checkpoints 2), keep the optimizer in the "
                  "newest file only (--save_optimizer latest), or write to another --log_dir; then --auto_resume")


class CheckpointError(UserError):
    """A checkpoint cannot be used or written; the message names the file and the fix."""


class DamagedCheckpoint(CheckpointError):
    """A file whose bytes are damaged (its CRC, a torn or unreadable zip): a resume may skip it for an older one."""


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


_warned_pointers = set()


def read_latest(log_dir):
    """The checkpoint latest_checkpoint.pt names, or None. A pointer is followed only to a file inside
    log_dir: one leading elsewhere (another run's folder) is ignored, with one line."""
    link = Path(log_dir) / LATEST_NAME
    target = None
    if link.is_symlink():
        target = link.parent / os.readlink(link)
    elif link.is_file() and link.stat().st_size < 4096:
        text = link.read_text(errors="replace").strip()
        if text.startswith(POINTER_MAGIC):
            target = link.parent / text[len(POINTER_MAGIC):]
    if target is None:
        return None
    target = target.resolve()
    if target.parent != link.parent.resolve():
        if str(link) not in _warned_pointers:
            _warned_pointers.add(str(link))
            log(f"{link} points outside its folder, at {target}: ignored (a run folder's pointer names its own files)")
        return None
    return target


def tensor_bytes(obj):
    """Bytes of the distinct tensors in a nested dict/list: about the size torch.save writes."""
    sizes = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)): t.numel() * t.element_size()
             for t in iter_tensors(obj)}  # keyed by what the tensor is: one met twice (a tied weight) is saved once
    return sum(sizes.values())


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
    if removed := files.remove_stale_temp_files(log_dir):
        log(f"removed {len(removed)} temp file(s) of an interrupted save from {log_dir}: {', '.join(removed)}")


# -----------------------------------------------------------------------------
# Loading and checking


def load_file(path):
    """The object a .pt file holds, loaded lean and safe: memory-mapped on the CPU where the file is a zip
    (pages are read as tensors are copied, so host RAM stays near one checkpoint and a GPU never holds a
    second copy), and weights_only, which refuses any pickle that would construct arbitrary objects or run
    code. The one global allowed is the GPTConfig build-nanogpt pickles, read by a stand-in that runs nothing
    (converters.PICKLE_STAND_INS)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's format; mmap needs it, older files are raw pickles
    try:
        with torch.serialization.safe_globals(converters.PICKLE_STAND_INS):
            return torch.load(path, map_location="cpu", mmap=is_zip, weights_only=True)
    except pickle.UnpicklingError as exc:
        if unsafe := re.search(r"GLOBAL (\S+)", str(exc)):
            raise CheckpointError(
                f"refused to load {path}: loading it would construct {unsafe.group(1)}, i.e. run code, not just read "
                "tensors and plain values. Only load files you trust; re-save it as a plain state dict") from None
        raise DamagedCheckpoint(f"{path} is not a readable checkpoint ({_reason(exc)})") from None
    except Exception as exc:  # truncated zip, garbage bytes, wrong format: all mean "unreadable"
        raise DamagedCheckpoint(f"{path} is not a readable checkpoint ({type(exc).__name__}: {_reason(exc)})") from None


def _reason(exc):
    """The informative sentence of torch's long load errors."""
    text = str(exc).strip()
    if unpickler := re.search(r"WeightsUnpickler error:\s*(.+)", text):
        return unpickler.group(1).strip()
    return re.split(r"(?<=\.)\s", text.splitlines()[0])[0] if text else "no details"


def load_checkpoint(path):
    """A .pt file's dict (load_file); this trainer's own files migrated to the current layout."""
    obj = load_file(path)
    return migrate(obj) if isinstance(obj, dict) and "format_version" in obj else obj


def migrate(ckpt):
    """A checkpoint of an older format in this format's layout, so that every reader knows one layout.
    Format 1 and 2 files keep resuming exactly; a newer format is left as it is (verify_checkpoint refuses it)."""
    version = ckpt["format_version"]
    if version >= FORMAT_VERSION:
        return ckpt
    ckpt = dict(ckpt)
    if version < 2:  # run_args became run_config; the model config's new fields default to what it computed
        ckpt.setdefault("run_config", ckpt.pop("run_args", None) or {})
    if version < 3:  # the TrainState was spread over the top level
        ckpt["train_state"] = {key: ckpt.pop(key) for key in ("step", "val_loss", "best_val_loss", "history")
                               if key in ckpt}
    ckpt.setdefault("kind", "checkpoint")
    ckpt["format_version"] = FORMAT_VERSION
    return ckpt


def read_checkpoint(path, for_training=False):
    """Any checkpoint file as a dict of this trainer: its checkpoints and exports (.pt, .safetensors) as
    they are; nanoGPT's, build-nanogpt's and llm.c's files (converters) as exports (from_foreign).
    for_training: the weights will be trained on here, so refuse what converters refuses for that."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    found = _read_any(path, for_training)
    return from_foreign(found) if isinstance(found, converters.Foreign) else found


def _read_any(path, for_training):
    """Another trainer's file as a converters.Foreign; this trainer's .pt files as their (migrated) dict.
    converters' errors become CheckpointErrors, which every caller here handles (skip the file, report it)."""
    try:
        if converters.is_llmc_file(path):
            return converters.read_llmc(path)
        obj = load_checkpoint(path)
        kind = converters.detect(obj)
        return converters.convert(obj, path, kind, for_training) if kind else obj
    except converters.ConverterError as exc:
        raise CheckpointError(str(exc)) from None


def read_foreign(path, for_training=False):
    """The converters.Foreign of an llm.c, nanoGPT or build-nanogpt file; None for this trainer's files."""
    found = _read_any(Path(path), for_training)
    return found if isinstance(found, converters.Foreign) else None


def from_foreign(foreign):
    """Another trainer's file (a converters.Foreign) as an export of this trainer, plus 'foreign' (what the
    file is) and 'notes'. Their step counters count the updates done; ours names the last completed step."""
    return {"format_version": FORMAT_VERSION, "kind": "export", "foreign": converters.KINDS[foreign.kind],
            "train_state": {"step": None if foreign.steps_done is None else foreign.steps_done - 1,
                            "val_loss": foreign.val_loss, "best_val_loss": foreign.best_val_loss},
            "model": foreign.tensors, "model_config": foreign.model_config, "optimizer": foreign.optimizer,
            "run_config": foreign.run_config, "notes": list(foreign.notes)}


def summary(ckpt):
    """What a file is, in one phrase: "nanoGPT checkpoint, 2 steps done, best val loss 3.2500"."""
    parts = [ckpt.get("foreign") or f"this trainer's {ckpt.get('kind', 'checkpoint')}"]
    state = ckpt.get("train_state") or {}
    if state.get("step") is not None:
        parts.append(f"{state['step'] + 1} step{'' if state['step'] == 0 else 's'} done")
    for key, name in (("val_loss", "val loss"), ("best_val_loss", "best val loss")):
        if state.get(key) is not None and math.isfinite(state[key]):  # a run never evaluated keeps inf as its best
            parts.append(f"{name} {state[key]:.4f}")
    return ", ".join(parts)


def check_zip_crc(path):
    """Read every byte and compare it with the CRC-32 the zip records for it: catches bit rot and
    torn copies that torch.load with mmap would load silently."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        raise DamagedCheckpoint(f"{path} is not a readable checkpoint ({exc})") from None
    if bad is not None:
        raise DamagedCheckpoint(f"{path} is corrupt: {bad} does not match its CRC-32 (a damaged copy or disk)")


def stored_config(ckpt, path):
    """The model config dict of a checkpoint, with the fields older files lack filled in."""
    try:
        return vars(config_from_dict(dict(ckpt["model_config"])))
    except ModelConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def run_config_of(ckpt):
    """The run's settings as stored (migrate() gives format 1 files theirs too)."""
    return ckpt.get("run_config") or {}


def not_resumable(path, kind):
    return CheckpointError(f"{path} is another trainer's file ({converters.KINDS[kind]}): it cannot resume a run here. "
                           f"Start a new run from its weights with --init_from {path}")


def verify_checkpoint(ckpt, path, model_config=None, model_keys=None, allow_export=False):
    """Raise CheckpointError unless ckpt has what a resume needs, shaped like this run's model."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint of this trainer")
    if foreign := converters.detect(ckpt):
        raise not_resumable(path, foreign)
    if ckpt.get("kind") == "export" and not allow_export:
        raise CheckpointError(f"{path} is an export (weights and config only): it cannot resume training. "
                              "Resume from a model_*.pt, or use checkpoint.load_model for inference")
    if isinstance(ckpt.get("format_version"), int) and ckpt["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {ckpt['format_version']}, newer than this code's "
                              f"{FORMAT_VERSION}; update the code (git pull)")
    missing = [k for k in REQUIRED["export" if ckpt.get("kind") == "export" else "checkpoint"] if k not in ckpt]
    if missing or "step" not in (ckpt.get("train_state") or {}):
        raise CheckpointError(f"{path} lacks {', '.join(missing or ['a step'])}: not a checkpoint of this trainer")
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
        if unexpected := sorted(set(ckpt["model"]) - set(model_keys)):
            raise CheckpointError(f"{path} has tensors this model lacks: {', '.join(unexpected[:3])}")


def model_keys_of(ckpt, path):
    """The tensor names and shapes a GPT of the checkpoint's own model config has (built on the meta device)."""
    model = model_from_config(stored_config(ckpt, path), device="meta")  # stored_config has checked the shape
    return {k: v.shape for k, v in model.state_dict().items()}


def read_weights(path, for_training=False):
    """(tensors, model_config dict, the file's dict) of any checkpoint file (read_checkpoint's), prefixes
    stripped, tied weights filled, keys and shapes checked against a model of that config."""
    path = Path(path)
    ckpt = read_checkpoint(path, for_training)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path} has no model and model_config: not a checkpoint or export of this trainer, "
                              "nor a file of nanoGPT, build-nanogpt or llm.c")
    model_config = stored_config(ckpt, path)
    tensors = {converters.WRAPPER_PREFIX.sub("", k): v for k, v in ckpt["model"].items()}
    for tied, source in TIED_WEIGHTS.items():
        if tied not in tensors and source in tensors:
            tensors[tied] = tensors[source]
    export = {"format_version": FORMAT_VERSION, "train_state": {"step": 0}, "kind": "export", "model": tensors,
              "model_config": model_config}
    verify_checkpoint(export, path, model_keys=model_keys_of(export, path), allow_export=True)
    return tensors, model_config, ckpt


def load_model(path, device="cpu"):
    """(GPT in eval mode on device, model_config dict) from any checkpoint file: this trainer's checkpoints
    and exports, nanoGPT's, build-nanogpt's, llm.c's. For sampling, HellaSwag and the like: what a conversion
    chose is logged, one line each (these commands log to stderr: their results go to stdout)."""
    tensors, model_config, ckpt = read_weights(path)
    for note in ckpt.get("notes", ()):
        log(note)
    model = model_from_config(model_config)
    model.load_state_dict(tensors)  # copies, casting bf16/fp16 exports up to the model's fp32
    return model.to(device).eval(), model_config


def _read_safetensors(path):
    """An export written as .safetensors, as the dict of a .pt export."""
    safetensors_torch = import_safetensors()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "model_config" not in metadata:
        raise CheckpointError(f"{path} has no model_config in its metadata: not an export of this trainer")
    return {"format_version": FORMAT_VERSION, "kind": "export",
            "train_state": json.loads(metadata.get("train_state", '{"step": null}')),
            "model": safetensors_torch.load_file(str(path)), "model_config": json.loads(metadata["model_config"])}


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
    elif isinstance(obj, (dict, list, tuple)):
        for v in obj.values() if isinstance(obj, dict) else obj:
            yield from iter_tensors(v)


def verify_file(path):
    """Read every byte and tensor of any checkpoint file (read_checkpoint's); check structure, keys and shapes
    against a model built from its own model_config, and that weights are finite. Returns the checkpoint."""
    path = Path(path)
    if zipfile.is_zipfile(path):  # False for a missing file, which read_checkpoint reports
        check_zip_crc(path)
    ckpt = read_checkpoint(path)
    verify_checkpoint(ckpt, path, allow_export=True)
    verify_checkpoint(ckpt, path, model_keys=model_keys_of(ckpt, path), allow_export=True)
    for name, t in ckpt["model"].items():
        if t.is_floating_point() and not bool(t.isfinite().all()):
            raise CheckpointError(f"{path}: {name} holds NaN or inf")
    for t in iter_tensors(ckpt.get("optimizer")):
        if t.is_floating_point() and not bool(t.isfinite().all()):
            raise CheckpointError(f"{path}: the optimizer state holds NaN or inf")
    return ckpt


if __name__ == "__main__":  # the tools live in scripts/checkpoint_tool.py; this keeps `python checkpoint.py ...` working
    import runpy

    runpy.run_module("scripts.checkpoint_tool", run_name="__main__", alter_sys=True)  # the repo root is sys.path[0]
