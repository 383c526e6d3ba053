"""Checkpoints that never lose work: atomic saves, exact resume, lean and safe loading.

Public API (the training loop makes one call per concern):
    ckpt = CheckpointManager(log_dir, model, optimizer, train_loader, model_config, run_args, interval=..., ddp=...)
    start_step = ckpt.resume(auto=True, path=None, load_optimizer=True)   # 0 when starting fresh
    ckpt.maybe_save(step, train_loss=..., val_loss=..., force=False)     # interval, last step, best, signals
    ckpt.close()                                                         # waits for a background write
    stop = GracefulStop(); stop.agreed(ddp)                              # SIGTERM / Ctrl-C: save, then exit
    load_checkpoint(path) -> dict                                        # mmap, weights_only: never runs code

Files in log_dir: model_{step:05d}.pt, latest_checkpoint.pt (symlink, or a small pointer file
where symlinks are impossible), best_model.pt (weights of the lowest validation loss).
A checkpoint's `step` is the last completed step; training resumes at step + 1.
"""
import errno
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

FORMAT_VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"^model_(\d+)\.pt$")
LATEST_NAME = "latest_checkpoint.pt"
BEST_NAME = "best_model.pt"
POINTER_MAGIC = "checkpoint-pointer:"
SAVE_RETRIES = 3  # network filesystems hiccup; a few tries with backoff, then report


class CheckpointError(Exception):
    """A checkpoint cannot be used or written; the message names the file and the fix."""


class NonFiniteLoss(CheckpointError):
    def __init__(self, step, loss, last_good):
        kept = f"the last good checkpoint is {last_good}; " if last_good else "no checkpoint was written yet; "
        super().__init__(f"loss is {loss} at step {step}: stopped without saving. {kept}"
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
    last_error = None
    for attempt in range(retries):
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
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
            tmp.unlink(missing_ok=True)
            if attempt + 1 < retries:
                wait = 0.5 * 2 ** attempt
                print(f"checkpoint write to {path} failed ({exc}); retrying in {wait:.1f} s")
                time.sleep(wait)
    hint = " (the disk is full: free space or lower --keep_last_n_checkpoints)" if last_error.errno == errno.ENOSPC else ""
    raise CheckpointError(f"could not write {path} after {retries} tries: {last_error}{hint}. "
                          "Older checkpoints are untouched.")


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


def load_checkpoint(path):
    """Load lean and safe: memory-mapped on the CPU (pages are read as tensors are copied, so host RAM
    stays near one checkpoint and the GPU never holds a second copy) and weights_only, which refuses
    any pickle that would construct arbitrary objects or run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"refused to load {path}: it needs code execution to load (it pickles Python objects, not just "
                "tensors and plain values). Only load files you trust; re-save it as a plain state dict") from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({exc})") from None
    except Exception as exc:  # truncated zip, garbage bytes, wrong format: all mean "unreadable"
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None


def verify_checkpoint(ckpt, path, model_config=None, model_keys=None):
    """Raise CheckpointError unless ckpt has what a resume needs, shaped like this run's model."""
    missing = [k for k in ("format_version", "step", "model", "model_config") if k not in ckpt]
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
                raise CheckpointError(f"{path} has no tensor {key}")
            if tuple(ckpt["model"][key].shape) != tuple(shape):
                raise CheckpointError(f"{path}: {key} has shape {tuple(ckpt['model'][key].shape)}, expected {tuple(shape)}")


def unwrapped_state_dict(model):
    """Weights without DDP's `module.` or torch.compile's `_orig_mod.` prefixes. The tied
    wte / lm_head weight appears under both names; torch.save stores its storage once."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model.state_dict()


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
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "state": {"key": np.array(n["key"], dtype=np.uint32),
                         "pos": n["pos"]}, "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        for i, s in enumerate(cuda_states):
            torch.cuda.set_rng_state(s, i)
    if "mps" in state and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


# -----------------------------------------------------------------------------
# Background writes: snapshot to CPU memory, then write while training continues.


def snapshot_to_cpu(obj, buffers, prefix=""):
    """Copy every tensor in a nested dict/list to CPU memory that training will not touch.
    GPU tensors land in pinned buffers reused across saves (fast DMA, no re-allocation)."""
    if isinstance(obj, torch.Tensor):
        buf = buffers.get(prefix)
        if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
            buf = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
            buffers[prefix] = buf
        buf.copy_(obj.detach(), non_blocking=obj.is_cuda)
        return buf
    if isinstance(obj, dict):
        return {k: snapshot_to_cpu(v, buffers, f"{prefix}/{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot_to_cpu(v, buffers, f"{prefix}/{i}") for i, v in enumerate(obj))
    return obj


class CheckpointManager:
    def __init__(self, log_dir, model, optimizer, train_loader, model_config, run_args, *, interval,
                 keep_last_n=-1, save_optimizer="all", async_save=False, ddp=None):
        self.log_dir = Path(log_dir)
        self.model, self.optimizer, self.train_loader = model, optimizer, train_loader
        self.model_config, self.run_args = dict(model_config), dict(run_args)
        self.interval, self.keep_last_n = interval, keep_last_n
        self.save_optimizer, self.async_save = save_optimizer, async_save
        self.ddp = ddp
        self.is_master = ddp is None or ddp.master
        self.history = {"train": [], "val": []}
        self.best_val_loss = float("inf")
        self._thread, self._thread_error, self._buffers = None, None, {}
        self.last_save_stall_s = None  # how long the last save held up training

    # -- resuming ------------------------------------------------------------

    def resume(self, auto=False, path=None, load_optimizer=True):
        """Load the chosen checkpoint into model, optimizer, loader and RNGs; return the step to start at."""
        if not auto and path is None:
            return 0
        chosen = self._choose(auto, path) if self.is_master else None
        if self.ddp is not None and self.ddp.enabled:
            box = [str(chosen) if chosen else None]
            dist.broadcast_object_list(box, src=0)  # every rank loads the file rank 0 chose
            chosen = Path(box[0]) if box[0] else None
        if chosen is None:
            self._say(f"no checkpoint in {self.log_dir}: starting fresh")
            return 0
        ckpt = load_checkpoint(chosen)
        self._apply(ckpt, chosen, load_optimizer)
        return ckpt["step"] + 1

    def _choose(self, auto, path):
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise CheckpointError(f"checkpoint {path} does not exist. {self._existing_summary()}")
            self._verified(path)  # a bad explicit file is an error, not a fallback
            return path
        candidates = []
        latest = read_latest(self.log_dir)
        if latest is not None:
            candidates.append(latest)
        candidates += [p.resolve() for _, p in reversed(list_checkpoints(self.log_dir)) if p.resolve() not in candidates]
        for candidate in candidates:
            try:
                self._verified(candidate)
                self._say(f"auto-resume: {candidate}")
                return candidate
            except CheckpointError as exc:
                self._say(f"auto-resume: skipping {candidate.name}: {exc}")
        return None

    def _verified(self, path):
        keys = {k: v.shape for k, v in self.model.state_dict().items()}
        verify_checkpoint(load_checkpoint(path), path, self.model_config, keys)

    def _existing_summary(self):
        existing = list_checkpoints(self.log_dir)
        if not existing:
            return f"There are no checkpoints in {self.log_dir}."
        return "Checkpoints in {}: {}".format(self.log_dir, ", ".join(p.name for _, p in existing))

    def _apply(self, ckpt, path, load_optimizer):
        verify_checkpoint(ckpt, path, self.model_config, {k: v.shape for k, v in self.model.state_dict().items()})
        self.model.load_state_dict(ckpt["model"])  # copies into the existing parameters
        if load_optimizer and ckpt.get("optimizer") is None:
            raise CheckpointError(f"{path} holds weights only (saved with --save_optimizer latest); "
                                  "resume from the newest checkpoint, or pass --reset_optimizer to start a fresh optimizer")
        if load_optimizer:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        else:
            self._say("weights loaded with a fresh optimizer (--reset_optimizer)")
        self.train_loader.load_state(ckpt["dataloader"])
        restore_rng_state(ckpt["rng"])
        self.history = {"train": [list(x) for x in ckpt["history"]["train"]], "val": [list(x) for x in ckpt["history"]["val"]]}
        self.best_val_loss = ckpt.get("best_val_loss", float("inf"))
        old_max, new_max = ckpt.get("run_args", {}).get("max_steps"), self.run_args.get("max_steps")
        if old_max is not None and old_max != new_max:
            self._say(f"--max_steps changed from {old_max} to {new_max}: the LR schedule is recomputed from step {ckpt['step'] + 1}")
        self._say(f"resumed from {path} (step {ckpt['step']}): continuing at step {ckpt['step'] + 1}")

    # -- saving --------------------------------------------------------------

    def maybe_save(self, step, train_loss=None, val_loss=None, force=False):
        """Record this step's losses; save on the interval, when forced (last step, signal), and
        best_model.pt when the validation loss improves. Returns the path written, if any."""
        if train_loss is not None:
            self.history["train"].append([step, train_loss])
        if val_loss is not None:
            self.history["val"].append([step, val_loss])
            if val_loss < self.best_val_loss:
                self.best_val_loss = val_loss
                self._save_best(step, val_loss)
        due = self.interval > 0 and step > 0 and step % self.interval == 0
        if not (due or force):
            return None
        return self.save(step, val_loss)

    def save(self, step, val_loss=None):
        path = step_path(self.log_dir, step)
        if self.is_master:
            t0 = time.perf_counter()
            self.wait()  # one write at a time; also surfaces an error of the previous one
            state = self._state(step, val_loss)
            if self.async_save:
                state = snapshot_to_cpu(state, self._buffers)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # the pinned copies must land before training mutates weights
                self._thread = threading.Thread(target=self._write, args=(state, path, step), daemon=False)
                self._thread.start()
            else:
                self._write(state, path, step)
            self.last_save_stall_s = time.perf_counter() - t0
        if self.ddp is not None and self.ddp.enabled:
            dist.barrier()  # nobody reads a checkpoint before rank 0 has handed it over
        self._raise_thread_error()
        return path

    def _state(self, step, val_loss):
        return {
            "format_version": FORMAT_VERSION,
            "torch_version": torch.__version__,
            "step": step,
            "model": unwrapped_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "model_config": self.model_config,
            "run_args": self.run_args,
            "val_loss": val_loss,
            "best_val_loss": self.best_val_loss,
            "history": {"train": list(self.history["train"]), "val": list(self.history["val"])},
            "dataloader": self.train_loader.get_state(),
            "rng": capture_rng_state(),
        }

    def _write(self, state, path, step):
        try:
            previous = read_latest(self.log_dir)
            save_file(state, path)
            point_latest(self.log_dir, path)
            if self.save_optimizer == "latest" and previous is not None and previous != path.resolve() and previous.is_file():
                self._strip_optimizer(previous)
            self._prune()
            self._say(f"saved checkpoint {path}")
        except CheckpointError as exc:
            self._thread_error = exc
        except Exception as exc:  # anything else in a background thread must still reach the loop
            self._thread_error = CheckpointError(f"saving {path} failed: {type(exc).__name__}: {exc}")
        if not self.async_save:
            self._raise_thread_error()

    def _strip_optimizer(self, path):
        """Keep weights only in an older checkpoint (about 1/3 the size), atomically."""
        ckpt = load_checkpoint(path)
        if ckpt.get("optimizer") is not None:
            ckpt["optimizer"] = None
            save_file(ckpt, path)

    def _save_best(self, step, val_loss):
        if not self.is_master:
            return
        state = {"format_version": FORMAT_VERSION, "torch_version": torch.__version__, "step": step,
                 "model": unwrapped_state_dict(self.model), "model_config": self.model_config,
                 "run_args": self.run_args, "val_loss": val_loss}
        save_file(state, self.log_dir / BEST_NAME)

    def _prune(self):
        """Delete the oldest step checkpoints beyond keep_last_n, never the one latest points at."""
        if self.keep_last_n is None or self.keep_last_n < 0:
            return
        checkpoints = list_checkpoints(self.log_dir)
        protected = {read_latest(self.log_dir)}
        excess = len(checkpoints) - max(self.keep_last_n, 1)
        for _, path in checkpoints:
            if excess <= 0:
                break
            if path.resolve() in protected:
                continue
            path.unlink(missing_ok=True)
            excess -= 1

    def latest_path(self):
        return read_latest(self.log_dir)

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _raise_thread_error(self):
        if self._thread_error is not None:
            error, self._thread_error = self._thread_error, None
            raise error

    def close(self):
        self.wait()
        self._raise_thread_error()

    def _say(self, message):
        if self.is_master:
            print(message)


# -----------------------------------------------------------------------------
# Signals: pre-emption sends SIGTERM with a grace period; Ctrl-C sends SIGINT.


class GracefulStop:
    """First SIGTERM/SIGINT: finish the current step, save, exit cleanly. Second Ctrl-C: exit at once."""

    def __init__(self):
        self.signal_name = None
        self._flag = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._handle)

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
        device = torch.device("cuda", ddp.local_rank) if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if self._flag else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signal_name is None:
            self.signal_name = "a signal on another rank"
        return bool(flag.item())
