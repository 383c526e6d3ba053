"""Rank 1 fails to compile (or fails the trial step): every rank must end up eager, wrapped in DDP,
and agree on the smallest and largest value. Usage: agree_compile.py compile|trial OUT_DIR"""
import json
import sys

import environment  # noqa: F401
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import device
import distributed

fails_in, out_dir = sys.argv[1], sys.argv[2]
ctx = distributed.setup("cpu")


def compile_fails_on_rank_1(model, mode=None):
    if ctx.rank == 1 and fails_in == "compile":
        raise RuntimeError("no compiler on this node")
    return model


def trial(model):
    if ctx.rank == 1 and fails_in == "trial":
        raise RuntimeError("the first call failed on this node")
    with model.no_sync():  # as device.forward_backward: the trial syncs nothing
        model(torch.ones(1, 2)).sum().backward()


torch.compile = compile_fails_on_rank_1
wrapped, mode = device.compile_model(torch.nn.Linear(2, 2), "cpu", "default", trial=trial, wrap=DDP)
result = dict(mode=mode, ddp=isinstance(wrapped, DDP), min=distributed.agree(10 + ctx.rank, "min"),
              max=distributed.agree(10 + ctx.rank, "max"), from_rank0=distributed.from_rank0(f"rank {ctx.rank}"))
with open(f"{out_dir}/rank{ctx.rank}.json", "w") as f:
    f.write(json.dumps(result))
del wrapped
distributed.close()
