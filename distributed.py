"""Several processes: the process group, DDP, and the collectives every module uses.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them there is one process and every
function here is a no-op that returns its input, so callers need no `if distributed` branches.

    ctx = setup(device_type, one_rank_group=False, timeout=None)   -> Dist(enabled, rank, local_rank, world_size);
                                     .master is rank 0; timeout (seconds): every collective's, None for torch's
    close()                          leave the process group so that no rank aborts at exit
    wrap_ddp(model, ctx, bucket_cap_mb, bucket_view=True)
    shard_fsdp(model, blocks, dtype) FSDP2: each block and the root sharded over the ranks
    is_sharded(module), clip_grad_norm(parameters, max_norm)   the same with and without FSDP
    on_rank0(fn, *args, share=None)  fn on rank 0 only (reads, checks, writes): its result, or its exception, on every rank
    from_rank0(value)                rank 0's value (any picklable object) on every rank
    agree(value, op)                 the "min" or "max" of an int over all ranks: one decision for all
    all_values(value)                every rank's value (any picklable object), in rank order, on every rank
    mean_over_ranks(t), sum_over_ranks(t)   in place on a tensor, returned
    barrier()
    is_master()                      rank 0, or the only process
    peer_processes()                 [(host, pid)] of every rank, in rank order, gathered at setup()
"""
import contextlib
import datetime
import os
import pickle
import socket
import time
import uuid
from dataclasses import dataclass

import environment  # noqa: F401  before torch: it sets variables torch reads when it loads
import torch
import torch.distributed as dist

from cli import UserError


class RankZeroError(UserError):
    """Rank 0 failed in work it does for all ranks (not a user mistake it could name): every rank stops with it."""


@dataclass(frozen=True)
class Dist:
    enabled: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self):
        return self.rank == 0


def active():
    return dist.is_available() and dist.is_initialized()


def is_master():
    """Rank 0, or the only process: the one that prints and writes files."""
    return not active() or dist.get_rank() == 0


def setup(device_type, one_rank_group=False, timeout=None):
    """Join torchrun's process group (NCCL on CUDA, gloo otherwise), or one process without torchrun:
    with one_rank_group (FSDP needs a group even alone), a group of that one process. timeout: seconds
    a collective may wait before it fails (None: torch's default, 10 minutes for NCCL, 30 for gloo)."""
    timeout = None if timeout is None else datetime.timedelta(seconds=timeout)
    if "RANK" not in os.environ:
        if not one_rank_group:
            return Dist()
        if device_type == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
        return Dist(True, 0, 0, 1)
    ctx = Dist(True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    # Under torchrun's elastic agent: this attempt's own keys in the agent's store (_attempt_store says why).
    store = _attempt_store(ctx, timeout or datetime.timedelta(minutes=30))
    where = dict(store=store, rank=ctx.rank, world_size=ctx.world_size) if store is not None else {}
    if device_type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
        # Bound to its GPU: NCCL then neither guesses the device from the rank nor waits for the
        # first collective to set up.
        where["device_id"] = torch.device("cuda", ctx.local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=timeout, **where)
    _peers[:] = all_values((socket.gethostname(), os.getpid()))  # for naming a rank that died (watchdog.py)
    return ctx


_peers = []


def peer_processes():
    """[(host, pid)] of every rank of the group, in rank order (empty before setup() or without a group)."""
    return list(_peers)


# Keys of this project in torchrun's store; each attempt's process group lives under its own token.
ATTEMPT_PREFIX = "gpt2-train/attempt"


def _attempt_store(ctx, timeout):
    """The store that this attempt's process group forms through, or None for init_process_group's
    own (env://: rank 0 hosts a new store for each attempt).

    torchrun's agent (c10d rendezvous, --standalone's too, and static) hosts one TCPStore
    for the whole job and hands every attempt the same address (TORCHELASTIC_USE_AGENT_STORE=True).
    init_process_group writes its keys into it without any prefix per attempt: gloo's
    default_pg/0//cpu//0/<rank> (each rank's address), NCCL's unique id. After a restart each rank
    finds the dead attempt's keys already there and connects to ports that no longer exist ("Gloo
    connectFullMesh failed ... Connection refused", NCCL's "socketPollConnect ... Connection
    refused", pytorch/pytorch#135712, #167288), until the restarts are spent.
    TORCHELASTIC_RESTART_COUNT cannot name the attempt: each agent counts only its own failures,
    so after one machine's failure the machines disagree. Instead rank 0 names the attempt with a
    fresh token, and each other rank proves it has this attempt's token (not a dead attempt's,
    which the store still holds) by a nonce of its own that rank 0 echoes back."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    leader = f"{ATTEMPT_PREFIX}/leader"
    hello, welcome = f"{ATTEMPT_PREFIX}/{{}}/hello/{{}}", f"{ATTEMPT_PREFIX}/{{}}/welcome/{{}}"
    if ctx.rank == 0:
        token = uuid.uuid4().hex
        store.set(leader, token)
        keys = [hello.format(token, r) for r in range(1, ctx.world_size)]
        if keys:
            store.wait(keys)  # every other rank of this attempt has read the token
            store.multi_set([welcome.format(token, r) for r in range(1, ctx.world_size)], store.multi_get(keys))
    else:
        token = _join_attempt(store, ctx.rank, leader, hello, welcome, timeout)
    return dist.PrefixStore(f"{ATTEMPT_PREFIX}/{token}/group", store)


def _join_attempt(store, rank, leader, hello, welcome, timeout):
    """Rank 0's token for this attempt: the one whose welcome echoes this rank's nonce. A token
    left by a dead attempt has no such welcome, so the rank polls until the new rank 0 has written
    its token (check, not a wait with a timeout: each of those logs two C++ warnings)."""
    nonce, said_hello_to, pause = uuid.uuid4().hex, None, 0.01
    deadline = time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        token = store.get(leader).decode()  # waits for the key in the job's first attempt
        if token != said_hello_to:
            store.set(hello.format(token, rank), nonce)
            said_hello_to = token
        if store.check([welcome.format(token, rank)]) and store.get(welcome.format(token, rank)).decode() == nonce:
            return token
        time.sleep(pause)
        pause = min(pause * 1.5, 0.5)  # the first attempt answers within milliseconds; a restart waits for rank 0
    raise dist.DistStoreError(f"rank {rank}: no rank 0 of this attempt answered within {timeout}")


def close():
    """Leave the process group so that no rank aborts at exit. Every rank first finishes
    communicating (the barrier). Then, on gloo, the main thread waits a moment without the GIL:
    gloo's worker threads free each finished collective's tensors, which takes the GIL, and a
    worker still doing so when the interpreter shuts down aborts the process ("terminate called
    without an active exception"; docs/DEVICES.md). Free DDP models before: a DDP Reducer that
    holds the group's last reference can hang the exit the same way."""
    if not active():
        return
    dist.barrier()
    if dist.get_backend() == "gloo":
        time.sleep(0.2)
    dist.destroy_process_group()


def from_rank0(value):
    """Rank 0's value on every rank: its choice of file, its error message, its state."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)  # under NCCL through the current GPU, set in setup()
    return box[0]


def on_rank0(fn, *args, share=None, **kwargs):
    """Rank 0 decides, every rank acts: fn(*args, **kwargs) runs on rank 0 alone (it reads files other
    machines may not have, checks, writes), and every rank returns its result, or raises its exception,
    together. share(result) is what the other ranks get (default: the result itself), for results too big
    to send (a loaded checkpoint: the other ranks get their part of it later, tensor by tensor).

    Any exception on rank 0 is caught: left uncaught, it would leave the other ranks waiting in the next
    collective until its timeout. A UserError is raised on every rank as the same class with the same
    message; anything else (an OSError of an open, a RuntimeError of a pinned allocation) as a RankZeroError
    naming it, rank 0's chained to the original. Without a process group: fn(*args, **kwargs)."""
    if not active():
        return fn(*args, **kwargs)
    result = error = None
    if is_master():
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001  every kind: the other ranks must hear of it
            error = exc
    shared, failure = from_rank0((share(result) if share and error is None else result, _portable(error))
                                 if is_master() else None)
    if failure is None:
        return result if is_master() else shared
    if is_master() and isinstance(error, UserError):
        raise error
    if is_master():
        raise failure from error
    raise failure


def _portable(error):
    """An exception every rank can raise: a UserError as it is (when it pickles), else a RankZeroError."""
    if error is None:
        return None
    if isinstance(error, UserError):
        with contextlib.suppress(Exception):  # a subclass with an unusual constructor
            pickle.dumps(error)
            return error
    return RankZeroError(f"rank 0 failed: {type(error).__name__}: {error}")


def agree(value, op):
    """The min ("min") or max ("max") of an int over all ranks; with booleans, "max" is any and "min" is all."""
    if not active():
        return value
    # Collective tensors live on the rank's GPU under NCCL, on the CPU under gloo.
    nccl = dist.get_backend() == "nccl"
    t = torch.tensor([int(value)], device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return int(t.item())


def all_values(value):
    """Every rank's value, in rank order, on every rank (a list of one without a process group)."""
    if not active():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_(tensor):
    """Rank 0's tensor into this rank's tensor of the same shape, in place (on the GPU under NCCL)."""
    if active():
        dist.broadcast(tensor, src=0)
    return tensor


def mean_over_ranks(tensor):
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.AVG)
    return tensor


def sum_over_ranks(tensor):
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier():
    if active():
        dist.barrier()


def wrap_ddp(model, ctx, bucket_cap_mb, bucket_view=True):
    """DDP whose gradients are views into its all-reduce buckets (bucket_view): no second fp32
    copy of the gradients (one more model-sized buffer otherwise). The training step zeroes them in
    place so they stay views, also through no_sync accumulation. bucket_view=False is PyTorch's
    default, kept for scripts/benchmark.py to compare."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    on_gpu = next(model.parameters()).device.type == "cuda"
    return DDP(model, device_ids=[ctx.local_rank] if on_gpu else None,
               bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=bucket_view)


def shard_fsdp(model, blocks, dtype):
    """FSDP2 (fully_shard): each of blocks, then the root (embeddings, final norm, lm_head), sharded
    over all ranks, so each holds 1/world_size of the weights, gradients and optimizer state; the
    weights are all-gathered block by block for compute (and again for the backward pass). dtype
    "bf16": compute in bf16 through FSDP's mixed-precision policy (no autocast), gradients reduced
    in fp32. Shards in place."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bf16" else None, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(module):
    return any(hasattr(p, "to_local") for p in module.parameters())  # a DTensor, as local() and clip_grad_norm tell


def local(tensor):
    """This rank's part of a tensor: the local shard of an FSDP DTensor, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def clip_grad_norm(parameters, max_norm):
    """torch.nn.utils.clip_grad_norm_, also over FSDP's sharded gradients: the norm is of the whole
    gradient, all ranks' shards together. Returns the norm before clipping."""
    parameters = list(parameters)
    if not any(hasattr(p, "to_local") for p in parameters):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    total = total.full_tensor() if hasattr(total, "full_tensor") else total
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach=True)
    return total
