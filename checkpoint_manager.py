"""The checkpoint manager: saves and restores a run's stateful objects, keeps the last N, writes in
the background. A file resumes under one process, DDP or FSDP at any world size, and no rank but 0
needs to see it (full_state.py moves the state between the ranks).

    ckpt = CheckpointManager(log_dir, {"model": model, "optimizer": opt, "dataloader": loader, "rng": RandomState(),
                                       "train_state": train_state, "scaler": None}, meta={...},
                             checkpoint_interval=1000, keep_last_n_checkpoints=-1, save_optimizer="all",
                             async_checkpoint=False)
    start_step = ckpt.resume(auto=True, path=None, reset_optimizer=False)  # 0 when starting fresh
    ckpt.maybe_save(step, best=False, force=False, epoch=None)            # interval, last step, best, epoch end
    with ckpt.saved_on_error(step): ...                                   # a crash in evaluation still saves the step
    ckpt.close()                                                          # waits for a background write

The manager saves and restores objects that have state_dict() / load_state_dict(), each under its name
in checkpoint.PARTS; it knows nothing of losses. The files themselves: checkpoint.py.
"""
import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import environment  # noqa: F401  before torch: it sets variables torch reads when it loads
import torch

import converters
import distributed
import files
import optimizers
from checkpoint import (BEST_NAME, CHECKPOINT_PATTERN, FORMAT_VERSION, PARTS, CheckpointError, check_zip_crc,
                        is_epoch_checkpoint, list_checkpoints, load_checkpoint, not_resumable, point_latest,
                        read_latest, remove_stale_temp_files, run_config_of, save_file, shapes, step_path,
                        verify_checkpoint)
from cli import UserError, log
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


# -----------------------------------------------------------------------------
# The manager


class CheckpointManager:
    """Saves and restores a run's stateful objects; keeps the last N; writes in the background.

    parts: {name in checkpoint.PARTS: object with state_dict() and load_state_dict(), or None}, each stored
    under its name ("model" without its DDP / compile wrappers). meta: plain values stored as they are
    (model_config, run_config, world_size). Every rank calls every method; rank 0 reads, chooses and
    writes, and all ranks return or raise together."""

    def __init__(self, log_dir, parts, *, meta=None, checkpoint_interval, keep_last_n_checkpoints=-1,
                 save_optimizer="all", async_checkpoint=False):
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise ValueError(f"parts {sorted(unknown)} are not in checkpoint.PARTS")
        self.log_dir = Path(log_dir)
        self.parts = dict(parts)
        self.model, self.train_state = self.parts["model"], self.parts["train_state"]
        self.meta = dict(meta or {})
        self.interval, self.keep_last_n = checkpoint_interval, keep_last_n_checkpoints
        self.save_optimizer, self.async_save = save_optimizer, async_checkpoint
        self.is_master = distributed.is_master()
        self._thread, self._thread_error, self._buffers = None, None, {}
        self.last_save_stall_s = None  # how long the last save held up training
        self.last_write_s = None  # how long the last write took, in the background or not
        if self.is_master:
            remove_stale_temp_files(self.log_dir)

    # -- resuming ------------------------------------------------------------

    def resume(self, auto=False, path=None, reset_optimizer=False):
        """Load the chosen checkpoint into every part; return the step to start at (0: fresh). Rank 0 reads,
        verifies and loads the file once; the other ranks receive the state."""
        if not auto and path is None:
            return 0
        chosen = distributed.on_rank0(self._choose, auto, path, reset_optimizer,
                                      share=lambda found: found and found[0])
        if auto:
            self._check_other_machines(chosen and (chosen[0] if self.is_master else chosen))
        if chosen is None:
            log(f"no checkpoint in {self.log_dir}: starting fresh")
            return 0
        path, ckpt = chosen if self.is_master else (chosen, None)
        return self._apply(ckpt, Path(path), reset_optimizer) + 1

    def _check_other_machines(self, chosen):
        """Without a shared disk only the machine that ran rank 0 holds the checkpoints. If rank 0 now
        runs on a machine without them, starting fresh would silently start the run over."""
        newest = max((step for step, _ in list_checkpoints(self.log_dir)), default=-1)
        seen = distributed.all_values((socket.gethostname(), os.path.realpath(self.log_dir), newest))
        host0, folder0, step0 = seen[0]
        newer = [(rank, host, step) for rank, (host, folder, step) in enumerate(seen)
                 if (host, folder) != (host0, folder0) and step > step0]  # another machine's own folder
        if not newer:
            return
        rank, host, step = max(newer, key=lambda item: item[2])
        where = f"model_{step:05d}.pt in {self.log_dir} on {host} (rank {rank})"
        if chosen is None:
            raise CheckpointError(f"rank 0 runs on {host0}, which has no checkpoint in {self.log_dir}, but {where}: run "
                                  f"the job with that machine as node rank 0, or copy its {self.log_dir} to {host0}")
        log(f"auto-resume: {where} is newer than rank 0's {Path(chosen).name}; resuming rank 0's (make that "
                 "machine node rank 0 to continue from its files)")

    def _choose(self, auto, path, reset_optimizer):
        """(path, its checkpoint dict, verified) of the file to resume from, or None; rank 0."""
        if path is not None:  # exactly this file: a bad one is an error, not a fallback
            path = Path(path)
            try:
                ckpt = self._verified(path)
            except CheckpointError as exc:
                raise CheckpointError(f"cannot resume from {path}: {exc}. {self.existing_summary()}") from None
            self._check_optimizer(ckpt, path, reset_optimizer)
            return str(path), ckpt
        candidates = []
        latest = read_latest(self.log_dir)
        if latest is not None:
            candidates.append(latest)  # first: after a resume from an older file, latest is the live timeline
        candidates += [p.resolve() for _, p in reversed(list_checkpoints(self.log_dir)) if p.resolve() not in candidates]
        for candidate in candidates:
            try:
                ckpt = self._verified(candidate)
            except CheckpointError as exc:
                log(f"auto-resume: skipping {candidate.name}: {exc}")
                continue
            self._check_optimizer(ckpt, candidate, reset_optimizer)
            log(f"auto-resume: {candidate}")
            return str(candidate), ckpt
        return None

    def _verified(self, path):
        if not Path(path).is_file():
            raise CheckpointError(f"{path} does not exist")
        if converters.is_llmc_model(path):
            raise not_resumable(path, "llm.c")
        check_zip_crc(path)
        ckpt = load_checkpoint(path)
        verify_checkpoint(ckpt, path, self.meta.get("model_config"), shapes(unwrap(self.model)))
        return ckpt

    def _check_optimizer(self, ckpt, path, reset_optimizer):
        if not reset_optimizer and self.parts.get("optimizer") is not None and ckpt.get("optimizer") is None:
            raise CheckpointError(f"{path} holds weights only (an older file of --save_optimizer latest, or "
                                  f"{BEST_NAME}); resume from the newest checkpoint, or pass --reset_optimizer "
                                  "to continue its weights with a fresh optimizer")
        # -- issue 25 (--optimizer muon): another optimizer's state does not load; switching means a fresh one
        if not reset_optimizer and self.parts.get("optimizer") is not None:
            theirs = optimizers.kind_of_state(ckpt.get("optimizer"))
            ours = optimizers.kind_of_state(self.parts["optimizer"].state_dict())
            if theirs is not None and theirs != ours:
                raise CheckpointError(f"{path} was trained with --optimizer {theirs} and this run asks for --optimizer "
                                      f"{ours}: pass --optimizer {theirs} to continue it, or --reset_optimizer to "
                                      f"continue its weights with a fresh {ours}")

    def existing_summary(self):
        existing = list_checkpoints(self.log_dir)
        if (self.log_dir / BEST_NAME).is_file():
            existing.append((None, self.log_dir / BEST_NAME))
        if not existing:
            return f"There are no checkpoints in {self.log_dir}."
        return "Checkpoints in {}: {}".format(self.log_dir, ", ".join(p.name for _, p in existing))

    def _apply(self, ckpt, path, reset_optimizer):
        """Load rank 0's checkpoint, verified (None on the other ranks), into every part; returns its step."""
        # Everything but the weights and the optimizer is small: rank 0 sends it as it is.
        rest = distributed.from_rank0({k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}
                                      if ckpt is not None else None)
        for name, part in self.parts.items():
            if part is None:
                continue
            if name == "model":
                load_full_model_state(part, ckpt["model"] if ckpt is not None else None)  # into the existing parameters
            elif name == "optimizer":
                if not reset_optimizer:
                    load_full_optimizer_state(part, ckpt["optimizer"] if ckpt is not None else None)
                else:
                    log("weights loaded with a fresh optimizer (--reset_optimizer)")
            elif name == "scaler" and reset_optimizer:
                continue
            elif rest.get(name) is not None:  # a scaler of a run without fp16 stores None
                part.load_state_dict(rest[name])
        step = rest["train_state"]["step"]
        self._say_changes(run_config_of(rest), step)
        log(f"resumed from {path} (step {step}): continuing at step {step + 1}")
        return step

    def _say_changes(self, old, step):
        new = self.meta.get("run_config") or {}
        if bool(old.get("deterministic")) != bool(new.get("deterministic")) and "deterministic" in new:
            log(f"warning: the checkpoint's run {'was' if old.get('deterministic') else 'was not'} --deterministic "
                     f"and this one {'is' if new['deterministic'] else 'is not'}: the steps from {step + 1} on "
                     + ("repeat bit for bit from here, not the run before" if new["deterministic"] else
                        "no longer repeat bit for bit on CUDA"))
        if "max_steps" in old and old["max_steps"] != new.get("max_steps"):
            log(f"--max_steps changed from {old['max_steps']} to {new.get('max_steps')}: "
                     f"the LR schedule is recomputed from step {step + 1}")
        changed = [f"{k} {old[k]} -> {new[k]}" for k in ("total_batch_size", "seq_len", "max_lr", "min_lr",
                   "warmup_steps", "weight_decay", "grad_clip") if k in old and k in new and old[k] != new[k]]
        if changed:
            log("resuming with changed settings: " + ", ".join(changed))

    # -- saving --------------------------------------------------------------

    def maybe_save(self, step, best=False, force=False, epoch=None):
        """Save on the interval, when forced (last step, signal), best_model.pt when best, and an epoch
        checkpoint when epoch (the number of passes over the data now complete) is given. Returns the
        step checkpoint written, if any. A background write that failed is reported here, at once."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()
        due = self.interval > 0 and step > 0 and step % self.interval == 0
        if not (due or force or best or epoch):
            return None
        return self.save(step, regular=due or force or bool(epoch), best=best, epoch=epoch)

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

    def estimate_file_bytes(self, with_optimizer=True):
        """About the size of one checkpoint: the weights, plus AdamW's two moments per weight."""
        weights = sum(p.numel() * p.element_size() for p in unwrap(self.model).parameters())
        moments = 2 * sum(p.numel() * 4 for p in unwrap(self.model).parameters() if p.requires_grad)
        return weights + (moments if with_optimizer and self.parts.get("optimizer") is not None else 0)

    def check_space(self, saves_planned):
        """One line, before the first save, when the disk cannot hold what this run will keep
        (keep_last_n, or every planned save) plus one file being written. Returns the line or None."""
        if not self.is_master:
            return None
        full, weights = self.estimate_file_bytes(), self.estimate_file_bytes(with_optimizer=False)
        kept = self.keep_last_n if self.keep_last_n and self.keep_last_n > 0 else max(saves_planned, 1)
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
                                  f"{self.last_good()}resume with --auto_resume, perhaps with a lower --max_lr")
        path = step_path(self.log_dir, step, epoch) if regular else None
        sharded = distributed.is_sharded(unwrap(self.model))
        t0 = time.perf_counter()
        state = self.state() if self.is_master or sharded else None  # FSDP: every rank sends its shards
        try:  # also the barrier: no rank runs ahead of a failed or unfinished save
            distributed.on_rank0(self._write_or_start, state, path, best, sharded)
        finally:
            self.last_save_stall_s = time.perf_counter() - t0
        return path

    def _write_or_start(self, state, path, best, sharded):
        """Rank 0: write the files now, or start the background write of a snapshot."""
        self.wait()  # one write at a time; raises if the previous background write failed
        self.log_dir.mkdir(parents=True, exist_ok=True)
        jobs = self._jobs(state, path, best)
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

    def last_good(self):
        """'the last good checkpoint is X; ' (or that there is none), for error messages."""
        last = self.latest_path()
        return f"the last good checkpoint is {last}; " if last else "no checkpoint was written yet; "

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

    def _jobs(self, state, path, best):
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
                        and CHECKPOINT_PATTERN.match(previous.name) and not is_epoch_checkpoint(previous)
                        and previous.is_file()):
                    self._strip_optimizer(previous)
                self._prune()
            self.last_write_s = time.perf_counter() - t0
            log("saved " + " and ".join(str(target) for target, _ in jobs))
        except UserError as exc:
            self._thread_error = exc if isinstance(exc, CheckpointError) else CheckpointError(str(exc))
        except Exception as exc:  # anything else in a background thread must still reach the loop
            self._thread_error = CheckpointError(f"saving {path} failed: {type(exc).__name__}: {exc}")

    def _strip_optimizer(self, path):
        """Keep weights only in an older checkpoint (about 1/3 the size), atomically."""
        ckpt = load_checkpoint(path)
        if ckpt.get("optimizer") is not None:
            save_file({**ckpt, "optimizer": None, "scaler": None}, path)

    def _prune(self):
        """Delete the oldest step checkpoints beyond keep_last_n, never the one latest points at, never
        an epoch checkpoint."""
        if self.keep_last_n is None or self.keep_last_n < 0:
            return
        checkpoints = [(s, p) for s, p in list_checkpoints(self.log_dir) if not is_epoch_checkpoint(p)]
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
        distributed.on_rank0(self.wait)
