"""The checkpoint manager: saves and restores a run's stateful objects, keeps the last N, writes in
the background, and moves the state between ranks, so that a file resumes under one process, DDP or
FSDP at any world size, and no rank but 0 needs to see it.

    ckpt = CheckpointManager(log_dir, {"model": model, "optimizer": opt, "dataloader": loader, "rng": RandomState(),
                                       "train_state": train_state, "scaler": None}, meta={...}, interval=...,
                             every_minutes=0)                           # also by wall time, rank 0's clock
    start_step = ckpt.resume(auto=True, path=None, load_optimizer=True)   # 0 when starting fresh
    ckpt.maybe_save(step, best=False, force=False, epoch=None)            # interval, minutes, last step, best, epoch end
    with ckpt.saved_on_error(step): ...                                   # a crash in evaluation still saves the step
    ckpt.close()                                                          # waits for a background write
    init_from_file(path, model, optimizer, load_optimizer, log)          # a new run from any checkpoint file's weights

The manager saves and restores objects that have state_dict() / load_state_dict(); it knows
nothing of losses. The files themselves: checkpoint.py.
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
import watchdog
from checkpoint import (BEST_NAME, CHECKPOINT_PATTERN, FORMAT_VERSION, TIED_WEIGHTS, CheckpointError,
                        check_zip_crc, is_epoch_checkpoint, list_checkpoints, load_checkpoint, not_resumable,
                        point_latest, read_latest, read_weights, remove_stale_temp_files, run_config_of, save_file,
                        shapes, step_path, summary, verify_checkpoint)
from cli import UserError
from model import unwrap


def init_from_file(path, model, optimizer, load_optimizer=False, log=print):
    """Start a new run (step 0) from the weights of any checkpoint file, copied into model; a model with a
    shorter position table keeps the first positions. With load_optimizer, the file's AdamW state as well
    (load_adamw_state). One line each: the conversion's notes, what the file is, what the optimizer does.
    Every rank calls it; rank 0 reads the file and sends the others their part (DDP, FSDP)."""
    tensors = state = None
    if distributed.is_master():
        tensors, model_config, ckpt = read_weights(path, for_training=True)
        for note in ckpt.get("notes", ()):
            log(note)
        log(f"init_from {path}: {summary(ckpt)}; training starts at step 0 of a new run")
        block_size = unwrap(model).config.block_size
        if block_size < model_config["block_size"]:
            log(f"--block_size {block_size}: the first {block_size} of the file's {model_config['block_size']} positions")
            tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"][:block_size]
        state = ckpt.get("optimizer")
        if state is not None and load_optimizer:
            log(f"optimizer: the AdamW moments and step counts of {path} (--init_from_optimizer), with this run's "
                "learning rate, betas and weight decay")
        elif state is not None:
            log(f"optimizer: fresh AdamW; {path} holds an AdamW state that maps onto it: --init_from_optimizer "
                "continues it")
        elif "foreign" not in ckpt:  # for other trainers' files, converters' notes say it
            log(f"optimizer: fresh AdamW ({path} holds weights only)")
    load_full_model_state(model, tensors)  # into the existing parameters, on their device
    if distributed.from_rank0(state is not None) and load_optimizer:
        load_adamw_state(optimizer, state)


def load_adamw_state(optimizer, state):
    """An AdamW state dict's moments and step counts (this trainer's, or nanoGPT's, which maps onto the same
    groups) with this optimizer's hyperparameters: the run's flags win over the file's weight decay and betas,
    and the fused / capturable settings decide where torch puts the step counts. state: on rank 0 (None on
    the other ranks, which get their part from it)."""
    if state is not None:
        ours = optimizer.state_dict()["param_groups"]
        groups = [{**theirs, **{k: v for k, v in mine.items() if k != "params"}}
                  for theirs, mine in zip(state["param_groups"], ours)]
        state = {**state, "param_groups": groups}
    load_full_optimizer_state(optimizer, state)


# -----------------------------------------------------------------------------
# The whole state on rank 0, whatever the parallelism. A file always holds the unsharded model and
# an optimizer state keyed by parameter index (torch.optim's format), so it moves between one
# process, DDP and FSDP at any world size. Loading reads the file on rank 0 only and sends the
# state to the other ranks over the process group: no rank but 0 needs to see the file.


def _is_tensor(value):
    return isinstance(value, torch.Tensor)


def full_model_state(model):
    """Every rank calls it. FSDP: the shards gathered one tensor at a time to rank 0's CPU (a dict of
    plain tensors there, {} elsewhere), so host memory holds one copy. Otherwise the module's own
    state_dict (live tensors, unwrapped)."""
    module = unwrap(model)
    state = module.state_dict()
    if not distributed.is_sharded(module):
        return state
    master, full = distributed.is_master(), {}
    for name, tensor in state.items():
        if TIED_WEIGHTS.get(name) in state:  # one tensor with the weight it is tied to, stored once
            if master:
                full[name] = full[TIED_WEIGHTS[name]]
            continue
        whole = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # a collective for a shard
        if master:
            full[name] = whole.detach().to("cpu", copy=True)
    return full if master else {}


def full_optimizer_state(optimizer):
    """Every rank calls it. optimizer.state_dict(), with FSDP's sharded moments gathered to rank 0's
    CPU ({} on the other ranks)."""
    state = optimizer.state_dict()
    if not any(hasattr(v, "full_tensor") for entry in state["state"].values() for v in entry.values()):
        return state
    master, gathered = distributed.is_master(), {}
    for index, entry in state["state"].items():
        values = {}
        for key, value in entry.items():
            whole = value.full_tensor() if hasattr(value, "full_tensor") else value
            values[key] = whole.detach().to("cpu", copy=True) if _is_tensor(whole) else whole
        if master:
            gathered[index] = values
    return {"state": gathered, "param_groups": state["param_groups"]} if master else {}


def _receive(like, source, shape, dtype):
    """Rank 0's tensor (source on rank 0, None elsewhere) as this rank's value shaped like `like`:
    its shard when `like` is an FSDP DTensor of that shape, the whole tensor otherwise."""
    device = distributed.local(like).device
    whole = source.to(device, dtype) if source is not None else torch.empty(shape, dtype=dtype, device=device)
    if hasattr(like, "device_mesh") and tuple(like.shape) == tuple(shape):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=0)
    return distributed.broadcast_(whole)


def load_full_model_state(model, state):
    """Every rank calls it; state is the file's weights on rank 0, None elsewhere."""
    module = unwrap(model)
    if not distributed.active():
        module.load_state_dict(state)
        return
    local_state = module.state_dict()
    if distributed.is_master():
        missing = sorted(set(local_state) - set(state) - set(TIED_WEIGHTS))
        if missing:
            raise CheckpointError(f"the checkpoint has no tensor {missing[0]}")
    with torch.no_grad():
        for name, tensor in local_state.items():
            if TIED_WEIGHTS.get(name) in local_state:
                continue  # the same parameter as the one it is tied to
            source = state.get(name, state.get(TIED_WEIGHTS.get(name))) if state is not None else None
            value = _receive(tensor, source, tensor.shape, tensor.dtype)
            distributed.local(tensor).copy_(distributed.local(value))


def load_full_optimizer_state(optimizer, state):
    """Every rank calls it; state is the file's optimizer state on rank 0, None elsewhere. Each
    rank gets its part: FSDP ranks the shards of their parameters, DDP ranks a whole copy."""
    if not distributed.active():
        optimizer.load_state_dict(state)
        return
    def shape_of(value):
        return ("tensor", tuple(value.shape), value.dtype) if _is_tensor(value) else value

    skeleton = distributed.from_rank0(
        {"state": {i: {k: shape_of(v) for k, v in e.items()} for i, e in state["state"].items()},
         "param_groups": state["param_groups"]} if state is not None else None)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    loaded = {}
    for index, entry in skeleton["state"].items():
        loaded[index] = {}
        for key, value in entry.items():
            if isinstance(value, tuple) and value[:1] == ("tensor",):
                source = state["state"][index][key] if state is not None else None
                value = _receive(params[index], source, value[1], value[2])
            loaded[index][key] = value
    optimizer.load_state_dict({"state": loaded, "param_groups": skeleton["param_groups"]})


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

    parts: {name: object with state_dict() and load_state_dict(), or None}. "model" is saved
    without its DDP / compile wrappers; "train_state" (a TrainState) is spread over the file's top
    level (step, val_loss, best_val_loss, history), where the tools read it; every other part is
    stored under its name. meta: plain values stored as they are (model_config, run_config,
    world_size). Every rank calls every method; rank 0 reads, chooses and writes, and all ranks
    return or raise together."""

    def __init__(self, log_dir, parts, *, meta=None, interval, keep_last_n=-1, save_optimizer="all",
                 async_save=False, every_minutes=0, log=print):
        self.log_dir = Path(log_dir)
        self.parts = dict(parts)
        self.model, self.train_state = self.parts["model"], self.parts["train_state"]
        self.meta = dict(meta or {})
        self.interval, self.keep_last_n = interval, keep_last_n
        self.save_optimizer, self.async_save = save_optimizer, async_save
        self.is_master = distributed.is_master()
        self.log = log if self.is_master else (lambda *a, **k: None)
        self._thread, self._thread_error, self._buffers = None, None, {}
        self.last_save_stall_s = None  # how long the last save held up training
        self.last_write_s = None  # how long the last write took, in the background or not
        self.every_s, self._last_save_t = every_minutes * 60, None  # --checkpoint_every_minutes; None: not started
        if self.is_master:
            remove_stale_temp_files(self.log_dir)

    # -- resuming ------------------------------------------------------------

    def resume(self, auto=False, path=None, load_optimizer=True):
        """Load the chosen checkpoint into every part; return the step to start at (0: fresh)."""
        if not auto and path is None:
            return 0
        chosen, error = None, None
        if self.is_master:
            try:
                chosen = self._choose(auto, path, load_optimizer)
            except CheckpointError as exc:
                error = str(exc)
        chosen, error = distributed.from_rank0((str(chosen) if chosen else None, error))
        if error:
            raise CheckpointError(error)
        if auto:
            self._check_other_machines(chosen)
        if chosen is None:
            self.log(f"no checkpoint in {self.log_dir}: starting fresh")
            return 0
        ckpt = load_checkpoint(chosen) if self.is_master else None  # rank 0 reads it; the others receive the state
        return self._apply(ckpt, Path(chosen), load_optimizer) + 1

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
        self.log(f"auto-resume: {where} is newer than rank 0's {Path(chosen).name}; resuming rank 0's (make that "
                 "machine node rank 0 to continue from its files)")

    def _choose(self, auto, path, load_optimizer):
        if path is not None:  # exactly this file: a bad one is an error, not a fallback
            path = Path(path)
            try:
                ckpt = self._verified(path)
            except CheckpointError as exc:
                raise CheckpointError(f"cannot resume from {path}: {exc}. {self.existing_summary()}") from None
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
                self.log(f"auto-resume: skipping {candidate.name}: {exc}")
                continue
            self._check_optimizer(ckpt, candidate, load_optimizer)
            self.log(f"auto-resume: {candidate}")
            return candidate
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

    def _check_optimizer(self, ckpt, path, load_optimizer):
        if load_optimizer and self.parts.get("optimizer") is not None and ckpt.get("optimizer") is None:
            raise CheckpointError(f"{path} holds weights only (an older file of --save_optimizer latest, or "
                                  f"{BEST_NAME}); resume from the newest checkpoint, or pass --reset_optimizer "
                                  "to continue its weights with a fresh optimizer")

    def existing_summary(self):
        existing = list_checkpoints(self.log_dir)
        if (self.log_dir / BEST_NAME).is_file():
            existing.append((None, self.log_dir / BEST_NAME))
        if not existing:
            return f"There are no checkpoints in {self.log_dir}."
        return "Checkpoints in {}: {}".format(self.log_dir, ", ".join(p.name for _, p in existing))

    def _apply(self, ckpt, path, load_optimizer):
        """Load rank 0's checkpoint (None on the other ranks) into every part; returns its step."""
        if ckpt is not None:
            verify_checkpoint(ckpt, path, self.meta.get("model_config"), shapes(unwrap(self.model)))
            self._check_optimizer(ckpt, path, load_optimizer)
        # Everything but the weights and the optimizer is small: rank 0 sends it as it is.
        rest = distributed.from_rank0({k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}
                                      if ckpt is not None else None)
        for name, part in self.parts.items():
            if part is None:
                continue
            if name == "model":
                load_full_model_state(part, ckpt["model"] if ckpt is not None else None)  # into the existing parameters
            elif name == "optimizer":
                if load_optimizer:
                    load_full_optimizer_state(part, ckpt["optimizer"] if ckpt is not None else None)
                else:
                    self.log("weights loaded with a fresh optimizer (--reset_optimizer)")
            elif name == "train_state":
                part.load_state_dict(rest)
            elif name == "scaler" and not load_optimizer:
                continue
            elif rest.get(name) is not None:  # a scaler of a run without fp16 stores None
                part.load_state_dict(rest[name])
        self._say_changes(run_config_of(rest), rest["step"])
        self.log(f"resumed from {path} (step {rest['step']}): continuing at step {rest['step'] + 1}")
        return rest["step"]

    def _say_changes(self, old, step):
        new = self.meta.get("run_config") or {}
        if bool(old.get("deterministic")) != bool(new.get("deterministic")) and "deterministic" in new:
            self.log(f"warning: the checkpoint's run {'was' if old.get('deterministic') else 'was not'} --deterministic "
                     f"and this one {'is' if new['deterministic'] else 'is not'}: the steps from {step + 1} on "
                     + ("repeat bit for bit from here, not the run before" if new["deterministic"] else
                        "no longer repeat bit for bit on CUDA"))
        if "max_steps" in old and old["max_steps"] != new.get("max_steps"):
            self.log(f"--max_steps changed from {old['max_steps']} to {new.get('max_steps')}: "
                     f"the LR schedule is recomputed from step {step + 1}")
        changed = [f"{k} {old[k]} -> {new[k]}" for k in ("total_batch_size", "seq_len", "max_lr", "min_lr",
                   "warmup_steps", "weight_decay", "grad_clip") if k in old and k in new and old[k] != new[k]]
        if changed:
            self.log("resuming with changed settings: " + ", ".join(changed))

    # -- saving --------------------------------------------------------------

    def maybe_save(self, step, best=False, force=False, epoch=None):
        """Save on the interval, when forced (last step, signal), best_model.pt when best, and an epoch
        checkpoint when epoch (the number of passes over the data now complete) is given. Returns the
        step checkpoint written, if any. A background write that failed is reported here, at once."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()
        due = self.interval > 0 and step > 0 and step % self.interval == 0
        due = self._minutes_due() or due
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
                self.log(f"could not save step {step} after the error below: {exc}")
            else:
                self.log(f"saved {path} before reporting the error below; --auto_resume continues after step {step}")
            raise

    def best_val_loss_on_disk(self):
        """The validation loss best_model.pt was saved with (inf without one): the best the folder has
        seen, also where a run resumed from an older checkpoint or started over is not yet that good."""
        best = float("inf")
        if self.is_master and (self.log_dir / BEST_NAME).is_file():
            try:
                best = float(load_checkpoint(self.log_dir / BEST_NAME).get("val_loss") or float("inf"))
            except CheckpointError as exc:
                self.log(f"{BEST_NAME} is unreadable ({exc}); a new one is written at the next best validation loss")
        return distributed.from_rank0(best)

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
        self.log(line)
        return line

    def save(self, step, regular=True, best=False, epoch=None):
        """Write model_{step}.pt (regular; model_{step}_epoch{epoch}.pt at the end of an epoch) and/or best_model.pt."""
        if not self._weights_finite():
            raise CheckpointError(f"the weights hold NaN or inf after step {step} (the update diverged): not saved. "
                                  f"{self.last_good()}resume with --auto_resume, perhaps with a lower --max_lr")
        watchdog.progress("checkpoint")
        path = step_path(self.log_dir, step, epoch) if regular else None
        if regular:
            self._last_save_t = time.monotonic()  # --checkpoint_every_minutes counts from the last step checkpoint
        sharded = distributed.is_sharded(unwrap(self.model))
        error, t0 = None, time.perf_counter()
        state = self.state() if self.is_master or sharded else None  # FSDP: every rank sends its shards
        if self.is_master:
            try:
                self.wait()  # one write at a time; raises if the previous background write failed
                self.log_dir.mkdir(parents=True, exist_ok=True)
                jobs = self._jobs(state, path, best)
                if self.async_save:
                    if not sharded:  # FSDP's gathered state is a private CPU copy already
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
        error = distributed.from_rank0(error)  # also the barrier: no rank runs ahead of a failed or unfinished save
        if error:
            raise CheckpointError(error)
        return path

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
            elif name == "train_state":
                state.update(part.state_dict())
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
            self.log("saved " + " and ".join(str(target) for target, _ in jobs))
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
        error = None
        if self.is_master:
            try:
                self.wait()
            except CheckpointError as exc:
                error = str(exc)
        error = distributed.from_rank0(error)
        if error:
            raise CheckpointError(error)
