"""Checkpoints that never lose work: atomic saves, exact resume, lean and safe loading, tools.

Public API (the training loop makes one call per concern):
    ckpt = CheckpointManager(log_dir, model, optimizer, train_loader, model_config, run_args, interval=..., ddp=...)
    start_step = ckpt.resume(auto=True, path=None, load_optimizer=True)   # 0 when starting fresh
    ckpt.maybe_save(step, train_loss=..., val_loss=..., force=False)     # interval, last step, best, signals
    ckpt.close()                                                         # waits for a background write
    with GracefulStop() as stop: ... stop.agreed(ddp)                    # SIGTERM / Ctrl-C: save, then exit
    load_checkpoint(path) -> dict                                        # mmap, weights_only: never runs code
    load_model(path, device) -> (GPT in eval mode, config dict)          # checkpoints and exports alike

    python checkpoint.py list DIR | inspect PATH | verify PATH|DIR | export PATH --out FILE [--dtype bf16]
    exit status: 0 ok, 1 a file is corrupt or invalid, 2 usage (bad arguments, missing path, missing package)

Files in log_dir: model_{step:05d}.pt, latest_checkpoint.pt (symlink, or a small pointer file
where symlinks are impossible), best_model.pt (lowest validation loss; everything but the optimizer).
A checkpoint's `step` is the last completed step; training resumes at step + 1.
"""
import argparse
import errno
import json
import os
import pickle
import random
import re
import signal
import sys
import threading
import time
import zipfile
from pathlib import Path

import device as device_mod  # before torch: it sets environment variables torch reads when it loads
import numpy as np
import torch
import torch.distributed as dist

FORMAT_VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"^model_(\d+)\.pt$")
TEMP_PATTERN = re.compile(r"^\..+\.tmp(\d+)$")  # what atomic_write leaves behind when killed
LATEST_NAME = "latest_checkpoint.pt"
BEST_NAME = "best_model.pt"
POINTER_MAGIC = "checkpoint-pointer:"
SAVE_RETRIES = 3  # network filesystems hiccup; a few tries with backoff, then report
SAVE_RETRY_WAIT_S = 0.5  # doubled after each failed try
TIED_WEIGHTS = {"lm_head.weight": "transformer.wte.weight"}  # GPT-2 ties its output and input embeddings
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointError(Exception):
    """A checkpoint cannot be used or written; the message names the file and the fix."""


class NonFiniteLoss(CheckpointError):
    def __init__(self, step, loss, last_good):
        kept = f"the last good checkpoint is {last_good}; " if last_good else "no checkpoint was written yet; "
        super().__init__(f"loss is {loss} at step {step}: stopped without saving. {kept}"
                         "resume with --auto_resume, perhaps with a lower --max_lr or --grad_clip 1.0")


class NonFiniteWeights(CheckpointError):
    def __init__(self, step, last_good):
        kept = f"the last good checkpoint is {last_good}; " if last_good else "no checkpoint was written yet; "
        super().__init__(f"the weights hold NaN or inf after step {step} (the update diverged): not saved. {kept}"
                         "resume with --auto_resume, perhaps with a lower --max_lr or --grad_clip 1.0")


# -----------------------------------------------------------------------------
# Files


def step_path(log_dir, step):
    return Path(log_dir) / f"model_{step:05d}.pt"


def list_checkpoints(log_dir):
    """[(step, path)] of model_*.pt in log_dir, oldest first."""
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


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write_fn, retries=SAVE_RETRIES):
    """Write to a temp file in the same directory, fsync, os.replace, fsync the directory.
    A crash at any instant leaves the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    last_error = None
    for attempt in range(retries):
        try:
            with open(tmp, "wb") as f:
                write_fn(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
            return
        except OSError as exc:
            last_error = exc
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                break  # a full disk stays full for the next second: report it now
            if attempt + 1 < retries:
                wait = SAVE_RETRY_WAIT_S * 2 ** attempt
                print(f"checkpoint write to {path} failed ({exc}); retrying in {wait:.1f} s")
                time.sleep(wait)
        except Exception as exc:  # a bug, not the filesystem: retrying would fail the same way
            raise CheckpointError(f"could not write {path}: {type(exc).__name__}: {exc}. "
                                  "Older checkpoints are untouched.") from exc
        finally:
            tmp.unlink(missing_ok=True)  # gone already after a successful os.replace
    full = last_error.errno in (errno.ENOSPC, errno.EDQUOT)
    hint = " (the disk is full: free space or lower --keep_last_n_checkpoints)" if full else ""
    tries = "" if full else f" after {retries} tries"
    raise CheckpointError(f"could not write {path}{tries}: {last_error}{hint}. Older checkpoints are untouched.")


def save_file(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def point_latest(log_dir, target):
    """Atomically point latest_checkpoint.pt at target (a file in log_dir)."""
    link = Path(log_dir) / LATEST_NAME
    tmp = link.with_name(f".{LATEST_NAME}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(Path(target).name, tmp)
    except (OSError, NotImplementedError):
        atomic_write(link, lambda f: f.write((POINTER_MAGIC + Path(target).name).encode()))
        return
    os.replace(tmp, link)
    fsync_dir(link.parent)


def remove_stale_temp_files(log_dir):
    """Delete temp files of writers that were killed mid-save (their process is gone)."""
    removed = []
    for name in os.listdir(log_dir) if Path(log_dir).is_dir() else []:
        m = TEMP_PATTERN.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            (Path(log_dir) / name).unlink(missing_ok=True)
            removed.append(name)
    if removed:
        print(f"removed {len(removed)} temp file(s) of an interrupted save from {log_dir}: {', '.join(removed)}")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -----------------------------------------------------------------------------
# Loading and checking


def load_checkpoint(path):
    """Load lean and safe: memory-mapped on the CPU (pages are read as tensors are copied, so host RAM
    stays near one checkpoint and the GPU never holds a second copy) and weights_only, which refuses
    any pickle that would construct arbitrary objects or run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's format; mmap needs it, older files are raw pickles
    try:
        return torch.load(path, map_location="cpu", mmap=is_zip, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"GLOBAL (\S+)", str(exc))
        if unsafe:
            raise CheckpointError(
                f"refused to load {path}: loading it would construct {unsafe.group(1)}, i.e. run code, not just read "
                "tensors and plain values. Only load files you trust; re-save it as a plain state dict") from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({_reason(exc)})") from None
    except Exception as exc:  # truncated zip, garbage bytes, wrong format: all mean "unreadable"
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {_reason(exc)})") from None


def _reason(exc):
    """The informative sentence of torch's long load errors."""
    text = str(exc).strip()
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if unpickler:
        return unpickler.group(1).strip()
    return re.split(r"(?<=\.)\s", text.splitlines()[0])[0] if text else "no details"


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


def verify_checkpoint(ckpt, path, model_config=None, model_keys=None, allow_export=False):
    """Raise CheckpointError unless ckpt has what a resume needs, shaped like this run's model."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint of this trainer")
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
        diffs = [f"{k}={ckpt['model_config'].get(k)} in the checkpoint but {v} in this run"
                 for k, v in model_config.items() if ckpt["model_config"].get(k) != v]
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


def unwrapped_state_dict(model):
    """Weights without DDP's `module.` or torch.compile's `_orig_mod.` prefixes. The tied
    wte / lm_head weight appears under both names; torch.save stores its storage once."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model.state_dict()


def _gpt_for(model_config, device=None):
    from train_gpt2 import GPT, GPTConfig  # here, not at the top: train_gpt2 imports this module

    try:
        config = GPTConfig(**model_config)
    except TypeError as exc:
        raise CheckpointError(f"model_config {model_config} does not fit this GPTConfig ({exc})") from None
    with torch.device(device or "cpu"):
        return GPT(config)


def load_model(path, device="cpu"):
    """(GPT in eval mode on device, model_config dict) from a training checkpoint or an export
    (.pt, or .safetensors when that package is installed). For sampling, HellaSwag and the like."""
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors, model_config = _read_safetensors(path)
    else:
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
            raise CheckpointError(f"{path} has no model and model_config: not a checkpoint or export of this trainer")
        tensors, model_config = dict(ckpt["model"]), dict(ckpt["model_config"])
    tensors = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in tensors.items()}
    for tied, source in TIED_WEIGHTS.items():
        if tied not in tensors and source in tensors:
            tensors[tied] = tensors[source]
    model = _gpt_for(model_config)
    verify_checkpoint({"format_version": FORMAT_VERSION, "step": 0, "kind": "export", "model": tensors,
                       "model_config": model_config}, path, model_keys=_shapes(model), allow_export=True)
    model.load_state_dict(tensors)  # copies, casting bf16/fp16 exports up to the model's fp32
    return model.to(device).eval(), model_config


def _shapes(model):
    return {k: v.shape for k, v in model.state_dict().items()}


def _read_safetensors(path):
    safetensors_torch = _import_safetensors()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "model_config" not in metadata:
        raise CheckpointError(f"{path} has no model_config in its metadata: not an export of this trainer")
    return safetensors_torch.load_file(str(path)), json.loads(metadata["model_config"])


def _import_safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise CheckpointError("the safetensors package is not installed: pip install safetensors, "
                              "or export to a .pt file") from None
    return safetensors.torch


# -----------------------------------------------------------------------------
# RNG state: plain types and tensors only, so weights_only loading accepts it.


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


# -----------------------------------------------------------------------------
# Background writes: snapshot to CPU memory, then write while training continues.


def snapshot_to_cpu(obj, buffers, copied=None):
    """Copy every tensor in a nested dict/list to CPU memory that training will not touch.
    Buffers are keyed by the source tensor and reused across saves; GPU tensors land in pinned
    buffers (fast DMA). A tensor met twice (the tied wte / lm_head weight) is copied once, so
    the file stays as small as a synchronous save's."""
    copied = {} if copied is None else copied
    if isinstance(obj, torch.Tensor):
        key = (obj.device, obj.data_ptr(), obj.dtype, tuple(obj.shape), tuple(obj.stride()))
        if key in copied:
            return copied[key]
        buf = buffers.get(key)
        if buf is None:
            buf = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
            buffers[key] = buf
        buf.copy_(obj.detach(), non_blocking=obj.is_cuda)
        copied[key] = buf
        return buf
    if isinstance(obj, dict):
        return {k: snapshot_to_cpu(v, buffers, copied) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot_to_cpu(v, buffers, copied) for v in obj)
    return obj


class CheckpointManager:
    def __init__(self, log_dir, model, optimizer, train_loader, model_config, run_args, *, interval,
                 keep_last_n=-1, save_optimizer="all", async_save=False, ddp=None, scaler=None):
        self.log_dir = Path(log_dir)
        self.model, self.optimizer, self.train_loader, self.scaler = model, optimizer, train_loader, scaler
        self.model_config, self.run_args = dict(model_config), dict(run_args)
        self.interval, self.keep_last_n = interval, keep_last_n
        self.save_optimizer, self.async_save = save_optimizer, async_save
        self.ddp = ddp if ddp is not None and ddp.enabled else None
        self.is_master = self.ddp is None or self.ddp.master
        self.history = {"train": [], "val": []}
        self.best_val_loss = float("inf")
        self._thread, self._thread_error, self._buffers = None, None, {}
        self.last_save_stall_s = None  # how long the last save held up training
        self.last_write_s = None  # how long the last write took, in the background or not
        if self.is_master:
            remove_stale_temp_files(self.log_dir)

    # -- resuming ------------------------------------------------------------

    def resume(self, auto=False, path=None, load_optimizer=True):
        """Load the chosen checkpoint into model, optimizer, loader and RNGs; return the step to start at."""
        if not auto and path is None:
            return 0
        chosen, error = None, None
        if self.is_master:
            try:
                chosen = self._choose(auto, path, load_optimizer)
            except CheckpointError as exc:
                error = str(exc)
        chosen, error = self._agree((str(chosen) if chosen else None, error))  # every rank loads rank 0's choice
        if error:
            raise CheckpointError(error)
        if chosen is None:
            self._say(f"no checkpoint in {self.log_dir}: starting fresh")
            return 0
        ckpt = load_checkpoint(chosen)
        self._apply(ckpt, Path(chosen), load_optimizer)
        return ckpt["step"] + 1

    def _choose(self, auto, path, load_optimizer):
        if path is not None:  # exactly this file: a bad one is an error, not a fallback
            path = Path(path)
            try:
                ckpt = self._verified(path)
            except CheckpointError as exc:
                raise CheckpointError(f"cannot resume from {path}: {exc}. {self._existing_summary()}") from None
            self._check_optimizer(ckpt, path, load_optimizer)
            return path
        candidates = []
        latest = read_latest(self.log_dir)
        if latest is not None:
            candidates.append(latest)  # first: after a resume from an older file, latest is the live timeline
        candidates += [p.resolve() for _, p in reversed(list_checkpoints(self.log_dir)) if p.resolve() not in candidates]
        for candidate in candidates:
            try:
                ckpt = self._verified(candidate)
            except CheckpointError as exc:
                self._say(f"auto-resume: skipping {candidate.name}: {exc}")
                continue
            self._check_optimizer(ckpt, candidate, load_optimizer)
            self._say(f"auto-resume: {candidate}")
            return candidate
        return None

    def _verified(self, path):
        if not Path(path).is_file():
            raise CheckpointError(f"{path} does not exist")
        check_zip_crc(path)
        ckpt = load_checkpoint(path)
        verify_checkpoint(ckpt, path, self.model_config, _shapes(self.model))
        return ckpt

    def _check_optimizer(self, ckpt, path, load_optimizer):
        if load_optimizer and ckpt.get("optimizer") is None:
            raise CheckpointError(f"{path} holds weights only (an older file of --save_optimizer latest, or "
                                  f"{BEST_NAME}); resume from the newest checkpoint, or pass --reset_optimizer "
                                  "to continue its weights with a fresh optimizer")

    def _existing_summary(self):
        existing = list_checkpoints(self.log_dir)
        if (self.log_dir / BEST_NAME).is_file():
            existing.append((None, self.log_dir / BEST_NAME))
        if not existing:
            return f"There are no checkpoints in {self.log_dir}."
        return "Checkpoints in {}: {}".format(self.log_dir, ", ".join(p.name for _, p in existing))

    def _apply(self, ckpt, path, load_optimizer):
        verify_checkpoint(ckpt, path, self.model_config, _shapes(self.model))
        self._check_optimizer(ckpt, path, load_optimizer)
        self.model.load_state_dict(ckpt["model"])  # copies into the existing parameters
        if load_optimizer:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scaler is not None and self.scaler.is_enabled() and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])  # fp16 loss scale: no burst of skipped steps
        else:
            self._say("weights loaded with a fresh optimizer (--reset_optimizer)")
        self.train_loader.load_state(ckpt["dataloader"])
        skipped = restore_rng_state(ckpt["rng"])
        if skipped:
            self._say(f"the checkpoint's {' and '.join(skipped)} random state is not restored: no such device here "
                      f"(the CPU, Python and NumPy streams are)")
        self.history = {"train": [list(x) for x in ckpt["history"]["train"]], "val": [list(x) for x in ckpt["history"]["val"]]}
        self.best_val_loss = ckpt.get("best_val_loss", float("inf"))
        old_args, step = ckpt.get("run_args", {}), ckpt["step"]
        if "max_steps" in old_args and old_args["max_steps"] != self.run_args.get("max_steps"):
            self._say(f"--max_steps changed from {old_args['max_steps']} to {self.run_args.get('max_steps')}: "
                      f"the LR schedule is recomputed from step {step + 1}")
        changed = [f"{k} {old_args[k]} -> {self.run_args[k]}" for k in ("total_batch_size", "seq_len", "max_lr", "min_lr",
                   "warmup_steps", "weight_decay", "grad_clip") if k in old_args and old_args[k] != self.run_args.get(k, old_args[k])]
        if changed:
            self._say("resuming with changed settings: " + ", ".join(changed))
        self._say(f"resumed from {path} (step {step}): continuing at step {step + 1}")

    # -- saving --------------------------------------------------------------

    def maybe_save(self, step, train_loss=None, val_loss=None, force=False):
        """Record this step's losses; save on the interval, when forced (last step, signal), and
        best_model.pt when the validation loss improves. Returns the step checkpoint written, if any."""
        if train_loss is not None:
            self.history["train"].append([step, train_loss])
        improved = False
        if val_loss is not None:
            self.history["val"].append([step, val_loss])
            improved = val_loss < self.best_val_loss  # NaN never improves
            if improved:
                self.best_val_loss = val_loss
        due = self.interval > 0 and step > 0 and step % self.interval == 0
        if not (due or force or improved):
            return None
        return self.save(step, val_loss, regular=due or force, best=improved)

    def save(self, step, val_loss=None, regular=True, best=False):
        """Write model_{step}.pt (regular) and/or best_model.pt. Every rank calls it; rank 0 writes,
        and all ranks return or raise together."""
        if not self._weights_finite():
            raise NonFiniteWeights(step, self.latest_path())
        path = step_path(self.log_dir, step) if regular else None
        error = None
        if self.is_master:
            t0 = time.perf_counter()
            try:
                self.wait()  # one write at a time; raises if the previous background write failed
                self.log_dir.mkdir(parents=True, exist_ok=True)
                jobs = self._jobs(step, val_loss, path, best)
                if self.async_save:
                    jobs = snapshot_to_cpu(jobs, self._buffers)
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()  # the pinned copies must land before training mutates weights
                    self._thread = threading.Thread(target=self._write, args=(jobs, path), name="checkpoint-writer")
                    self._thread.start()  # not a daemon: interpreter exit waits for the write
                else:
                    self._write(jobs, path)
                    self.wait()  # raises what _write recorded
            except CheckpointError as exc:
                error = str(exc)
            self.last_save_stall_s = time.perf_counter() - t0
        error = self._agree(error)  # also the barrier: no rank runs ahead of a failed or unfinished save
        if error:
            raise CheckpointError(error)
        return path

    def _weights_finite(self):
        flags = [p.isfinite().all() for p in self.model.parameters() if p.is_floating_point()]
        return bool(torch.stack(flags).all()) if flags else True

    def _jobs(self, step, val_loss, path, best):
        state = {
            "format_version": FORMAT_VERSION,
            "kind": "checkpoint",
            "torch_version": str(torch.__version__),  # a plain str: TorchVersion is a class
            "step": step,
            "model": unwrapped_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None and self.scaler.is_enabled() else None,
            "model_config": self.model_config,
            "run_args": self.run_args,
            "world_size": self.ddp.world_size if self.ddp else 1,
            "val_loss": val_loss,
            "best_val_loss": self.best_val_loss,
            "history": {"train": list(self.history["train"]), "val": list(self.history["val"])},
            "dataloader": self.train_loader.get_state(),
            "rng": capture_rng_state(),
        }
        jobs = [(path, state)] if path is not None else []
        if best:  # the same weights, without the optimizer: resumable with --reset_optimizer
            jobs.append((self.log_dir / BEST_NAME, {**state, "optimizer": None, "scaler": None}))
        return jobs

    def _write(self, jobs, path):
        t0 = time.perf_counter()
        try:
            previous = read_latest(self.log_dir)
            for target, state in jobs:
                save_file(state, target)
                if target == path:
                    point_latest(self.log_dir, path)
            if path is not None:
                if (self.save_optimizer == "latest" and previous is not None and previous != path.resolve()
                        and CHECKPOINT_PATTERN.match(previous.name) and previous.is_file()):
                    self._strip_optimizer(previous)
                self._prune()
            self.last_write_s = time.perf_counter() - t0
            self._say("saved " + " and ".join(str(target) for target, _ in jobs))
        except CheckpointError as exc:
            self._thread_error = exc
        except Exception as exc:  # anything else in a background thread must still reach the loop
            self._thread_error = CheckpointError(f"saving {path} failed: {type(exc).__name__}: {exc}")

    def _strip_optimizer(self, path):
        """Keep weights only in an older checkpoint (about 1/3 the size), atomically."""
        ckpt = load_checkpoint(path)
        if ckpt.get("optimizer") is not None:
            save_file({**ckpt, "optimizer": None, "scaler": None}, path)

    def _prune(self):
        """Delete the oldest step checkpoints beyond keep_last_n, never the one latest points at."""
        if self.keep_last_n is None or self.keep_last_n < 0:
            return
        checkpoints = list_checkpoints(self.log_dir)
        protected = read_latest(self.log_dir)
        excess = len(checkpoints) - max(self.keep_last_n, 1)
        for _, path in checkpoints:
            if excess <= 0:
                break
            if path.resolve() == protected:
                continue
            path.unlink(missing_ok=True)
            excess -= 1

    @property
    def writing(self):
        """True while a background write is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def latest_path(self):
        """The newest checkpoint on disk, after any write in flight has landed."""
        self._join()
        return read_latest(self.log_dir)

    def _join(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self):
        """Wait for a background write; raise CheckpointError if it failed."""
        self._join()
        if self._thread_error is not None:
            error, self._thread_error = self._thread_error, None
            raise error

    def close(self):
        error = None
        if self.is_master:
            try:
                self.wait()
            except CheckpointError as exc:
                error = str(exc)
        error = self._agree(error)
        if error:
            raise CheckpointError(error)

    def _agree(self, value):
        """Rank 0's value on every rank (its choice of file, its save error)."""
        if self.ddp is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _say(self, message):
        if self.is_master:
            print(message)


# -----------------------------------------------------------------------------
# Signals: pre-emption sends SIGTERM with a grace period; Ctrl-C sends SIGINT.


class GracefulStop:
    """First SIGTERM/SIGINT: finish the current step, save, exit cleanly. Second Ctrl-C: exit at once.

    A context manager: the handlers are installed on entry and the previous ones put back on exit,
    so a process that goes on after training (a notebook, a test, a forked worker) gets its own
    Ctrl-C and SIGTERM back."""

    def __init__(self):
        self.signal_name = None
        self._flag = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if self._flag and signum == signal.SIGINT:
            print("second Ctrl-C: exiting now without saving", file=sys.stderr)
            os._exit(130)
        self._flag = True
        self.signal_name = signal.Signals(signum).name
        print(f"{self.signal_name} received: finishing this step and saving a checkpoint "
              "(Ctrl-C again to exit at once)", file=sys.stderr)

    def agreed(self, ddp=None):
        """True when any rank was signalled; every rank gets the same answer."""
        if ddp is None or not ddp.enabled:
            return self._flag
        device = torch.device("cuda", ddp.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        signalled = bool(device_mod.agree(self._flag, "max", device))  # one all-reduce, one host sync
        if signalled and self.signal_name is None:
            self.signal_name = "a signal on another rank"
        return signalled


# -----------------------------------------------------------------------------
# Tools: python checkpoint.py list | inspect | verify | export


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _tensor_stats(obj):
    seen, count, nbytes = set(), 0, 0
    for t in _tensors(obj):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            count, nbytes = count + 1, nbytes + t.numel() * t.element_size()
    return count, nbytes


def _last_val(ckpt):
    if ckpt.get("val_loss") is not None:
        return ckpt["val_loss"]
    val = ckpt.get("history", {}).get("val") or [[None, None]]
    return val[-1][1]


def verify_file(path):
    """Read every byte and tensor of a checkpoint or export; check structure, keys and shapes against
    a model built from its own model_config, and that weights are finite. Returns the checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        tensors, model_config = _read_safetensors(path)
        ckpt = {"format_version": FORMAT_VERSION, "kind": "export", "step": None, "model": tensors, "model_config": model_config}
    else:
        if zipfile.is_zipfile(path):
            check_zip_crc(path)
        ckpt = load_checkpoint(path)
    verify_checkpoint(ckpt, path, allow_export=True)
    verify_checkpoint(ckpt, path, model_keys=_shapes(_gpt_for(ckpt["model_config"], device="meta")), allow_export=True)
    for name, t in ckpt["model"].items():
        if t.is_floating_point() and not bool(t.isfinite().all()):
            raise CheckpointError(f"{path}: {name} holds NaN or inf")
    for t in _tensors(ckpt.get("optimizer")):
        if t.is_floating_point() and not bool(t.isfinite().all()):
            raise CheckpointError(f"{path}: the optimizer state holds NaN or inf")
    return ckpt


def _cmd_list(args):
    log_dir = Path(args.dir)
    if not log_dir.is_dir():
        print(f"error: {log_dir} is not a directory", file=sys.stderr)
        return 2
    files = [p for _, p in list_checkpoints(log_dir)] + ([log_dir / BEST_NAME] if (log_dir / BEST_NAME).is_file() else [])
    if not files:
        print(f"no checkpoints in {log_dir}")
        return 0
    latest, status = read_latest(log_dir), 0
    print(f"{'file':<18} {'step':>7} {'val loss':>9} {'size':>10}  optimizer")
    for path in files:
        try:
            ckpt = load_checkpoint(path)
            val = _last_val(ckpt)
            row = (f"{ckpt.get('step', '?'):>7} {'-' if val is None else f'{val:.4f}':>9} "
                   f"{path.stat().st_size / 1e6:>7.1f} MB  {'yes' if ckpt.get('optimizer') is not None else 'no'}")
        except CheckpointError as exc:
            row, status = f"unreadable: {exc}", 1
        print(f"{path.name:<18} {row}{'  <- latest' if path.resolve() == latest else ''}")
    if latest is not None:
        print(f"latest -> {latest.name}" + ("" if latest.is_file() else " (missing!)"))
        status = status if latest.is_file() else 1
    return status


def _cmd_inspect(args):
    ckpt = load_checkpoint(args.path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{args.path} holds a {type(ckpt).__name__}, not a checkpoint of this trainer")
    run_args = ckpt.get("run_args") or {}
    summary = {k: run_args[k] for k in ("model", "data_root", "max_steps", "total_batch_size", "micro_batch_size",
                                        "seq_len", "max_lr", "min_lr", "warmup_steps", "dtype", "device", "seed") if k in run_args}
    history = ckpt.get("history") or {}
    model_count, model_bytes = _tensor_stats(ckpt.get("model"))
    opt_count, opt_bytes = _tensor_stats(ckpt.get("optimizer"))
    lines = [
        ("file", f"{args.path} ({Path(args.path).stat().st_size / 1e6:.1f} MB)"),
        ("kind", ckpt.get("kind", "checkpoint")),
        ("format version", ckpt.get("format_version")),
        ("torch version", ckpt.get("torch_version")),
        ("step", ckpt.get("step")),
        ("model_config", json.dumps(ckpt.get("model_config"))),
        ("run args", json.dumps(summary)),
        ("world size", ckpt.get("world_size")),
        ("val loss", ckpt.get("val_loss")),
        ("best val loss", ckpt.get("best_val_loss")),
        ("dataloader", json.dumps({k: v for k, v in (ckpt.get("dataloader") or {}).items() if k != "shards"})),
        ("history", f"{len(history.get('train', []))} train losses, {len(history.get('val', []))} val losses"),
        ("model tensors", f"{model_count} ({model_bytes / 1e6:.1f} MB)"),
        ("optimizer", f"{opt_count} tensors ({opt_bytes / 1e6:.1f} MB)" if ckpt.get("optimizer") is not None else "none (weights only)"),
        ("grad scaler", ckpt.get("scaler") or "none"),
    ]
    for name, value in lines:
        print(f"{name:<15} {value}")
    return 0


def _cmd_verify(args):
    path = Path(args.path)
    if path.is_dir():
        files = [p for _, p in list_checkpoints(path)] + ([path / BEST_NAME] if (path / BEST_NAME).is_file() else [])
        if not files:
            print(f"BAD  {path}: no checkpoints to verify")
            return 1
    elif path.is_file():
        files = [path]
    else:
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    status = 0
    for file in files:
        try:
            ckpt = verify_file(file)
            count, nbytes = _tensor_stats(ckpt)
            print(f"ok   {file}  step {ckpt.get('step')}  {count} tensors, {nbytes / 1e6:.1f} MB read")
        except CheckpointError as exc:
            print(f"BAD  {file}: {exc}")
            status = 1
    if path.is_dir() and ((path / LATEST_NAME).exists() or (path / LATEST_NAME).is_symlink()):
        latest = read_latest(path)
        if latest is None or not latest.is_file():
            print(f"BAD  {path / LATEST_NAME} points at {latest}, which does not exist")
            status = 1
    return status


def _cmd_export(args):
    out = Path(args.out)
    if out.suffix not in (".pt", ".safetensors"):
        print(f"error: --out {out} must end in .pt or .safetensors", file=sys.stderr)
        return 2
    if out.suffix == ".safetensors":
        try:
            safetensors_torch = _import_safetensors()
        except CheckpointError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    ckpt = verify_file(args.path)
    dtype, cast = EXPORT_DTYPES[args.dtype], {}
    weights = {}
    for name, t in ckpt["model"].items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in cast:  # cast a shared tensor once, so tied weights stay one tensor in a .pt
            cast[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
        weights[name] = cast[key]
    meta = {"format_version": FORMAT_VERSION, "kind": "export", "torch_version": str(torch.__version__),
            "step": ckpt.get("step"), "model_config": dict(ckpt["model_config"]), "val_loss": _last_val(ckpt),
            "dtype": args.dtype, "source": Path(args.path).name}
    if out.suffix == ".pt":
        save_file({**meta, "model": weights}, out)
    else:  # safetensors refuses tensors that share memory: drop the tied copy, say so in the metadata
        tied = {k: v for k, v in TIED_WEIGHTS.items() if k in weights and v in weights}
        tensors = {k: v for k, v in weights.items() if k not in tied}
        text_meta = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in meta.items()}
        text_meta["tied"] = json.dumps(tied)
        atomic_write(out, lambda f: f.write(safetensors_torch.save(tensors, metadata=text_meta)))
    print(f"exported {args.path} (step {ckpt.get('step')}) as {args.dtype} to {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description="Inspect, verify and export training checkpoints. "
                                "Exit status: 0 ok, 1 corrupt or invalid file, 2 usage error.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("list", help="every checkpoint in a log dir: step, val loss, size, optimizer, latest")
    s.add_argument("dir")
    s = sub.add_parser("inspect", help="what one checkpoint holds: versions, step, config, args, losses, data state")
    s.add_argument("path")
    s = sub.add_parser("verify", help="read every byte and tensor, check keys and shapes; exit 1 if any file is bad")
    s.add_argument("path", help="a checkpoint file, or a log dir (all model_*.pt, best_model.pt, latest)")
    s = sub.add_parser("export", help="weights and model config only, for inference or sharing")
    s.add_argument("path")
    s.add_argument("--out", required=True, help="output file, .pt or .safetensors")
    s.add_argument("--dtype", default="fp32", choices=sorted(EXPORT_DTYPES), help="cast floating-point weights to this")
    args = p.parse_args(argv)
    command = {"list": _cmd_list, "inspect": _cmd_inspect, "verify": _cmd_verify, "export": _cmd_export}[args.command]
    try:
        return command(args)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
