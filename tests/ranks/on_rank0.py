"""Rank 0 fails inside a decision it makes for every rank: each rank must stop at once with the same one-line
error (the same class for a UserError). Usage: on_rank0.py oserror|runtimeerror|usererror"""
import os
import sys

import environment  # noqa: F401

import cli
import distributed

kind = sys.argv[1]
ctx = distributed.setup("cpu")


def decide():
    if kind == "oserror":
        open("/nonexistent-folder/checkpoint.pt")
    if kind == "runtimeerror":
        raise RuntimeError("pinned allocation failed")
    raise cli.UsageError("--max_steps 0 cannot work: use at least 1")


try:
    distributed.on_rank0(decide)
except cli.UserError as exc:
    os.write(2, f"rank {ctx.rank}: {type(exc).__name__}: error: {exc}\n".encode())  # one write: ranks share stderr
    distributed.close()
    sys.exit(exc.exit_status)
