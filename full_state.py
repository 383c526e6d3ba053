"""A model's and its optimizer's whole state on rank 0, whatever the parallelism, and back: gathered for a
save, sent for a load. A file always holds the unsharded model and an optimizer state keyed by parameter
index (torch.optim's format), so it moves between one process, DDP and FSDP at any world size; loading
reads the file on rank 0 only and sends the state to the other ranks over the process group, so no rank
but 0 needs to see it. --init_from FILE loads any checkpoint file's weights the same way.

    full_model_state(model), full_optimizer_state(optimizer)      every rank calls; the whole state on rank 0
    load_full_model_state(model, state), load_full_optimizer_state(optimizer, state)   rank 0's state, every rank
    init_shape(path, block_size, with_optimizer, optimizer) -> GPTConfig   --init_from FILE's model shape, checked
    init_from_file(path, model, optimizer, load_optimizer)         a new run (step 0) from any file's weights
"""
import environment  # noqa: F401  before torch: it sets variables torch reads when it loads
import torch

import distributed
import optimizers
from checkpoint import CheckpointError, read_weights, summary
from cli import log
from model import TIED_WEIGHTS, GPTConfig, unwrap


def init_shape(path, block_size, with_optimizer=False, optimizer="adamw"):
    """--init_from FILE: the file's model shape (a GPTConfig), its position table cut to block_size where that is
    shorter (as gpt2_hf does). Read before anything is written, so that what the file cannot do is refused first.
    optimizer: the run's --optimizer, whose state with_optimizer (--init_from_optimizer) continues."""
    _, stored, ckpt = read_weights(path, for_training=True)
    config = GPTConfig(**{**stored, "block_size": min(block_size, stored["block_size"])})
    if with_optimizer and ckpt.get("optimizer") is None:
        raise CheckpointError(f"--init_from_optimizer: {path} ({summary(ckpt)}) holds no AdamW state that maps "
                              "onto this trainer's; drop the flag to start with a fresh one")
    theirs = optimizers.kind_of_state(ckpt.get("optimizer"))
    if with_optimizer and theirs not in (None, optimizer):
        raise CheckpointError(f"--init_from_optimizer: {path} holds the state of --optimizer {theirs}, which does not "
                              f"map onto --optimizer {optimizer}; use --optimizer {theirs}, or drop the flag to start "
                              f"with a fresh {optimizer}")
    if with_optimizer and config.block_size < stored["block_size"]:
        raise CheckpointError(f"--init_from_optimizer continues moments of all {stored['block_size']} positions of "
                              f"{path}; drop --block_size {block_size}, or the flag")
    return config


def init_from_file(path, model, optimizer, load_optimizer=False):
    """Start a new run (step 0) from the weights of any checkpoint file, copied into model; a model with a
    shorter position table keeps the first positions. With load_optimizer, the file's AdamW state as well
    (load_full_optimizer_state). One line each: the conversion's notes, what the file is, what the optimizer does.
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
        ours, theirs = optimizers.kind_of_state(optimizer.state_dict()), optimizers.kind_of_state(state)
        fresh = f"fresh {optimizers.NAMES[ours]}"
        if state is not None and load_optimizer:
            log(f"optimizer: the {optimizers.NAMES[ours]} moments and step counts of {path} (--init_from_optimizer), "
                "with this run's learning rate, betas and weight decay")
        elif state is not None and theirs == ours:
            log(f"optimizer: {fresh}; {path} holds an {optimizers.NAMES[theirs]} state that maps onto it: "
                "--init_from_optimizer continues it")
        elif state is not None:
            log(f"optimizer: {fresh} ({path} holds the state of --optimizer {theirs})")
        elif "foreign" not in ckpt:  # for other trainers' files, converters' notes say it
            log(f"optimizer: {fresh} ({path} holds weights only)")
    load_full_model_state(model, tensors)  # into the existing parameters, on their device
    if distributed.from_rank0(state is not None) and load_optimizer:
        load_full_optimizer_state(optimizer, state)


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
    return full


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
            values[key] = whole.detach().to("cpu", copy=True) if isinstance(whole, torch.Tensor) else whole
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
    """Every rank calls it; state is the file's optimizer state on rank 0, None elsewhere. Each rank gets its
    part: FSDP ranks the shards of their parameters, DDP ranks a whole copy. The file gives the moments and
    step counts; each group's settings stay this optimizer's: the run's flags win over the file's weight decay,
    betas and momentum (a resume may change them, and says so), and the fused / capturable settings decide
    where torch puts the step counts."""
    if state is not None:
        ours = optimizer.state_dict()["param_groups"]
        state = {**state, "param_groups": [{**theirs, **{k: v for k, v in mine.items() if k != "params"}}
                                           for theirs, mine in zip(state["param_groups"], ours)]}
    if not distributed.active():
        optimizer.load_state_dict(state)
        return
    def shape_of(value):
        return ("tensor", tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value

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
