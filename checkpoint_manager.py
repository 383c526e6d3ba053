"""The checkpoint manager: saves and restores a run's stateful objects, keeps the last N, writes in
the background. A file resumes under one process, DDP or FSDP at any world size, and no rank but 0
needs to see it (full_state.py moves the state between the ranks).

    ckpt = CheckpointManager(log_dir, {"model": model, "optimizer": opt, "dataloader": loader, "rng": RandomState(),
                                       "train_state": train_state, "scaler": None}, meta={...},
                             checkpoint_interval=1000, keep_last_n_checkpoints=-1, save_optimizer="all",
                             async_checkpoint=False, checkpoint_every_minutes=0)
    start_step = ckpt.load(resume) if resume else 0                         # run_folder.find_resume's choice
    ckpt.maybe_save(step, best=False, force=False, epoch=None)            # interval, minutes, last step, best, epoch end
    with ckpt.saved_on_error(step): ...                                   # a crash in evaluation still saves the step
    ckpt.close()                                                          # waits for a background write

The manager saves and restores objects that have state_dict() / load_state_dict(), each under its name
in checkpoint.PARTS; it knows nothing of losses. The files themselves: checkpoint.py.
"""
import contextlib
import threading
import time
from pathlib import Path

import environment  # noqa: F401  before torch: it sets variables torch reads when it loads
import torch

import distributed
import files
import optimizers
from checkpoint import (BEST_NAME, CHECKPOINT_PATTERN, FORMAT_VERSION, PARTS, CheckpointError, is_epoch_checkpoint,
                        list_checkpoints, load_checkpoint, point_latest, read_latest, remove_stale_temp_files,
                        save_file, step_path, verify_checkpoint)
from cli import UserError, log
import run_folder
import watchdog
from full_state import full_model_state, full_optimizer_state, load_full_model_state, load_full_optimizer_state
from model import unwrap


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
        if key not in buffers:
            buffers[key] = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
        copied[key] = buffers[key].copy_(obj.detach(), non_blocking=obj.is_cuda)
        return copied[key]
    if isinstance(obj, dict):
        return {k: snapshot_to_cpu(v, buffers, copied) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot_to_cpu(v, buffers, copied) for v in obj)
    return obj


# -----------------------------------------------------------------------------
# The manager


class CheckpointManager:
    """Saves and restores a run's stateful objects; keeps the last N; writes in the background.

    parts: {name in checkpoint.PARTS: object with state_dict() and load_state_dict(), or None}, each stored
    under its name ("model" without its DDP / compile wrappers). meta: plain values stored as they are
    (model_config, run_config, world_size). Every rank calls every method; rank 0 reads, chooses and
    writes, and all ranks return or raise together."""

    def __init__(self, log_dir, parts, *, meta=None, checkpoint_interval, keep_last_n_checkpoints=-1,
                 save_optimizer="all", async_checkpoint=False, checkpoint_every_minutes=0):
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise ValueError(f"parts {sorted(unknown)} are not in checkpoint.PARTS")
        self.log_dir = Path(log_dir)
        self.parts = dict(parts)
        self.model = self.parts["model"]
        self.meta = dict(meta or {})
        self.interval, self.keep_last_n = checkpoint_interval, keep_last_n_checkpoints
        self.save_optimizer, self.async_save = save_optimizer, async_checkpoint
        self.is_master = distributed.is_master()
        self._thread, self._thread_error, self._buffers = None, None, {}
        self.last_save_stall_s = None  # how long the last save held up training
        self.last_write_s = None  # how long the last write took, in the background or not
        self.last_healthy = None  # the newest checkpoint a healthy step's loss vouched for (or the one resumed from)
        self._unconfirmed = None  # the newest one saved, until the next step's loss vouches for it
        self._to_strip = []  # --save_optimizer latest: older healthy files to keep weights only in
        self.every_s, self._last_save_t = checkpoint_every_minutes * 60, None  # None: the clock has not started
        if self.is_master:
            remove_stale_temp_files(self.log_dir)

    # -- resuming ------------------------------------------------------------

    def load(self, resume, reset_optimizer=False, skip=()):
        """Load a run_folder.Resume (its dict on rank 0, None on the other ranks) into every part but those in skip;
        returns the step to start at. Rank 0 read and verified the file once; the other ranks receive the state."""
        self.last_healthy = resume.path if self.is_master else None  # resumed from: healthy by construction
        ckpt, path = resume.ckpt, Path(resume.path)
        if ckpt is not None:  # the run's model is built from the checkpoint's config: this only guards other callers
            verify_checkpoint(ckpt, path, self.meta.get("model_config"))
        if ckpt is not None and not reset_optimizer and self.parts.get("optimizer") is not None:
            theirs = optimizers.kind_of_state(ckpt.get("optimizer"))  # another optimizer's state does not load
            ours = optimizers.kind_of_state(self.parts["optimizer"].state_dict())
            if theirs is not None and theirs != ours:
                raise CheckpointError(f"{path} was trained with --optimizer {theirs} and this run asks for --optimizer "
                                      f"{ours}: drop --optimizer to continue it, or pass --reset_optimizer to continue "
                                      f"its weights with a fresh {ours}")
        # Everything but the weights and the optimizer is small: rank 0 sends it as it is.
        rest = distributed.from_rank0({k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}
                                      if ckpt is not None else None)
        for name, part in self.parts.items():
            if part is None or name in skip or (name == "scaler" and reset_optimizer):
                continue
            if name == "model":
                load_full_model_state(part, ckpt["model"] if ckpt is not None else None)  # into the existing parameters
            elif name == "optimizer" and reset_optimizer:
                log("weights loaded with a fresh optimizer (--reset_optimizer)")
            elif name == "optimizer":
                load_full_optimizer_state(part, ckpt["optimizer"] if ckpt is not None else None)
            elif rest.get(name) is not None:  # a scaler of a run without fp16 stores None
                part.load_state_dict(rest[name])
        step = rest["train_state"]["step"]
        log(f"resumed from {path} (step {step}): continuing at step {step + 1}")
        return step + 1

    # -- saving --------------------------------------------------------------

    def maybe_save(self, step, best=False, force=False, epoch=None, healthy=True):
        """Save on the interval, when forced (last step, signal), best_model.pt when best, and an epoch
        checkpoint when epoch (the number of passes over the data now complete) is given. Returns the
        step checkpoint written, if any. A background write that failed is reported here, at once.
        healthy (run_state.TrainState.healthy): this step's loss is not exploding. It vouches for the weights
        the step started from, i.e. for the last checkpoint saved before it: only such a checkpoint counts as
        healthy (a step with a huge learning rate saves broken weights after a loss that still looked fine).
        Rotation and --save_optimizer latest never touch the newest healthy checkpoint, so a run that blows
        up keeps one to go back to. Call it every step."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()
        if healthy and self._unconfirmed is not None:
            self._confirm(self._unconfirmed)
        self._unconfirmed = self._unconfirmed if healthy else None
        due = self._minutes_due() or (self.interval > 0 and step > 0 and step % self.interval == 0)
        if not (due or force or best or epoch):
            return None
        return self.save(step, regular=due or force or bool(epoch), best=best, epoch=epoch)

    def _minutes_due(self):
        """--checkpoint_every_minutes: rank 0's clock decides and every rank follows (one small all-reduce
        per step, only with the flag). A save is collective, and each rank's own clock would call it at
        another step."""
        if not self.every_s:
            return False
        if self._last_save_t is None:  # the clock starts at the first step, after start-up and compilation
            self._last_save_t = time.monotonic()
        return bool(distributed.agree(self.is_master and time.monotonic() - self._last_save_t >= self.every_s, "max"))

    @contextlib.contextmanager
    def saved_on_error(self, step):
        """Around the work after a training step (evaluation, samples, metrics): if it raises, save
        this step first (the state after the optimizer step is whole), then let the error through."""
        try:
            yield
        except Exception:
            try:
                path = self.save(step)
                self.wait()
            except Exception as exc:  # noqa: BLE001  the original error matters more; say this one in a line
                log(f"could not save step {step} after the error below: {exc}")
            else:
                log(f"saved {path} before reporting the error below; --auto_resume continues after step {step}")
            raise

    def best_val_loss_on_disk(self):
        """The validation loss best_model.pt was saved with (inf without one): the best the folder has
        seen, also where a run resumed from an older checkpoint or started over is not yet that good."""
        return distributed.on_rank0(self._best_on_disk)

    def _best_on_disk(self):
        if not (self.log_dir / BEST_NAME).is_file():
            return float("inf")
        try:  # memory-mapped: the pickle is read, no tensor is
            return float(load_checkpoint(self.log_dir / BEST_NAME).get("train_state", {}).get("val_loss") or "inf")
        except CheckpointError as exc:
            log(f"{BEST_NAME} is unreadable ({exc}); a new one is written at the next best validation loss")
            return float("inf")

    def check_space(self, saves_planned):
        """One line, before the first save, when the disk cannot hold what this run will keep
        (keep_last_n, or every planned save) plus one file being written. Returns the line or None."""
        if not self.is_master:
            return None
        # About the size of one checkpoint: the weights, plus AdamW's two fp32 moments per trained weight.
        weights = sum(p.numel() * p.element_size() for p in unwrap(self.model).parameters())
        moments = 2 * sum(p.numel() * 4 for p in unwrap(self.model).parameters() if p.requires_grad)
        full = weights + (moments if self.parts.get("optimizer") is not None else 0)
        kept = self.keep_last_n if self.keep_last_n > 0 else max(saves_planned, 1)
        older = weights if self.save_optimizer == "latest" else full
        needed = (kept - 1) * older + full + full + weights  # the kept ones, the one being written, best_model.pt
        free = files.free_bytes(self.log_dir)
        if free >= needed:
            return None
        line = (f"warning: {self.log_dir} has {files.gib(free)} free, but this run's checkpoints need about "
                f"{files.gib(needed)} ({kept} kept x {files.gib(older)}, one being written, {BEST_NAME}); the save that "
                f"does not fit will stop the run. Lower --keep_last_n_checkpoints, use --save_optimizer latest, or free space")
        log(line)
        return line

    def save(self, step, regular=True, best=False, epoch=None):
        """Write model_{step}.pt (regular; model_{step}_epoch{epoch}.pt at the end of an epoch) and/or best_model.pt."""
        if not self._weights_finite():
            raise CheckpointError(f"the weights hold NaN or inf after step {step} (the update diverged): not saved. "
                                  + self.diverged(step))
        watchdog.progress("checkpoint")
        path = step_path(self.log_dir, step, epoch) if regular else None
        if regular:
            self._last_save_t = time.monotonic()  # --checkpoint_every_minutes counts from the last step checkpoint
        sharded = distributed.is_sharded(unwrap(self.model))
        t0 = time.perf_counter()
        state = self.state() if self.is_master or sharded else None  # FSDP: every rank sends its shards
        try:  # also the barrier: no rank runs ahead of a failed or unfinished save
            distributed.on_rank0(self._write_or_start, state, path, best, sharded)
        finally:
            self.last_save_stall_s = time.perf_counter() - t0
        if path is not None:
            self._unconfirmed = str(path)  # healthy once the next step's loss, computed from it, says so
        return path

    def _write_or_start(self, state, path, best, sharded):
        """Rank 0: write the files now, or start the background write of a snapshot."""
        self.wait()  # one write at a time; raises if the previous background write failed
        self.log_dir.mkdir(parents=True, exist_ok=True)
        jobs = [(path, state)] if path is not None else []
        if best:  # the same weights, without the optimizer: resumable with --reset_optimizer
            jobs.append((self.log_dir / BEST_NAME, {**state, "optimizer": None, "scaler": None}))
        if not self.async_save:
            self._write(jobs, path)
            self.wait()  # raises what _write recorded
            return
        if not sharded:  # FSDP's gathered state is a private CPU copy already
            jobs = snapshot_to_cpu(jobs, self._buffers)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the pinned copies must land before training mutates weights
        self._thread = threading.Thread(target=self._write, args=(jobs, path), name="checkpoint-writer")
        self._thread.start()  # not a daemon: interpreter exit waits for the write

    def diverged(self, step):
        """The run blew up at step: the folder records its newest healthy checkpoint, which the next --auto_resume
        continues from (moving the exploded ones aside). Returns what the stop's message says about it."""
        self._join()
        if self.last_healthy is None:
            return "No healthy checkpoint was written yet: lower --max_lr and start again (--start_over)"
        if self.is_master:
            run_folder.record_divergence(self.log_dir, step, self.last_healthy)
        return (f"The last healthy checkpoint is {self.last_healthy}: lower --max_lr (or clip with --grad_clip 1.0) "
                "and run again with --auto_resume, which continues from it")

    def _weights_finite(self):
        flags = [distributed.local(p).isfinite().all() for p in self.model.parameters() if p.is_floating_point()]
        finite = bool(torch.stack(flags).all()) if flags else True
        return bool(distributed.agree(finite, "min")) if distributed.is_sharded(unwrap(self.model)) else finite

    def state(self):
        """The checkpoint dict of the state now: on rank 0 (every rank calls it under FSDP); tensors
        still on their devices, except FSDP's, gathered to the CPU."""
        state = {"format_version": FORMAT_VERSION, "kind": "checkpoint", "torch_version": str(torch.__version__)}
        for name, part in self.parts.items():
            if name == "model":
                state["model"] = full_model_state(part)
            elif name == "optimizer":
                state["optimizer"] = full_optimizer_state(part) if part is not None else None
            else:
                state[name] = part.state_dict() if part is not None else None
        state.update(self.meta)
        return state

    def _write(self, jobs, path):
        t0 = time.perf_counter()
        try:
            self._strip_confirmed()
            for target, state in jobs:
                save_file(state, target)
                if target == path:
                    point_latest(self.log_dir, path)
            if path is not None:
                self._prune()
            self.last_write_s = time.perf_counter() - t0
            log("saved " + " and ".join(str(target) for target, _ in jobs))
        except UserError as exc:
            self._thread_error = exc if isinstance(exc, CheckpointError) else CheckpointError(str(exc))
        except Exception as exc:  # anything else in a background thread must still reach the loop
            self._thread_error = CheckpointError(f"saving {path} failed: {type(exc).__name__}: {exc}")

    def _confirm(self, path):
        """path is healthy: it becomes the one to go back to, and (--save_optimizer latest) the one before it
        keeps weights only, stripped with the next write: until a newer one is vouched for, a healthy file keeps
        its optimizer, so that a resume after a blow-up continues exactly."""
        if self.save_optimizer == "latest" and self.last_healthy and self.last_healthy != path:
            self._to_strip.append(self.last_healthy)
        self.last_healthy = path

    def _strip_confirmed(self):
        """Keep weights only in the older checkpoints _confirm queued (about 1/3 the size), atomically."""
        while self._to_strip:
            path = Path(self._to_strip.pop(0))
            if CHECKPOINT_PATTERN.match(path.name) and path.is_file():  # step and epoch checkpoints, not pruned yet
                ckpt = load_checkpoint(path)
                if ckpt.get("optimizer") is not None:
                    save_file({**ckpt, "optimizer": None, "scaler": None}, path)

    def _prune(self):
        """Delete the oldest step checkpoints beyond keep_last_n, never the one latest points at, never
        the newest healthy one (kept beyond N while newer ones are not), never an epoch checkpoint."""
        if self.keep_last_n < 0:
            return
        checkpoints = [(s, p) for s, p in list_checkpoints(self.log_dir) if not is_epoch_checkpoint(p)]
        protected = {read_latest(self.log_dir), self.last_healthy and Path(self.last_healthy).resolve()}
        excess = len(checkpoints) - max(self.keep_last_n, 1)
        unprotected = [path for _, path in checkpoints if path.resolve() not in protected]
        for path in unprotected[:max(excess, 0)]:  # the oldest first
            path.unlink(missing_ok=True)

    @property
    def writing(self):
        """True while a background write is in flight."""
        return self._thread is not None and self._thread.is_alive()

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
        """At the end of the run: its last checkpoint counts as healthy (no step came after it to say otherwise)."""
        if self._unconfirmed is not None:
            self._confirm(self._unconfirmed)
        distributed.on_rank0(self._finish)

    def _finish(self):
        self.wait()
        self._strip_confirmed()
