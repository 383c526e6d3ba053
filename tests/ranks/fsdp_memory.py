"""What each rank holds under FSDP after a training step: bytes of its weights, gradients and AdamW
state, against the whole model's. Usage: fsdp_memory.py MODEL OUT_DIR"""
import json
import sys

import environment  # noqa: F401
import torch

import distributed
from model import GPT, GPTConfig, MODEL_PRESETS
from train_gpt2 import StepSpec, train_step

model_name, out_dir = sys.argv[1], sys.argv[2]
ctx = distributed.setup("cpu")
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=64, **MODEL_PRESETS[model_name]))
whole = sum(p.numel() * p.element_size() for p in model.parameters())
distributed.shard_fsdp(model, model.transformer.h, "fp32")
optimizer = model.configure_optimizer(0.1, 1e-3)


class Loader:
    def next_batch(self):
        g = torch.Generator().manual_seed(ctx.rank)
        return torch.randint(0, 50257, (1, 64), generator=g), torch.randint(0, 50257, (1, 64), generator=g)


train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), Loader(), 1e-3,
           StepSpec(2, 1.0, torch.device("cpu"), "fp32", "fsdp"))


def local_bytes(tensors):
    return sum(distributed.local(t).numel() * t.element_size() for t in tensors)


held = {"weights": local_bytes(model.parameters()), "gradients": local_bytes(p.grad for p in model.parameters()),
        "adamw": local_bytes(v for s in optimizer.state.values() for k, v in s.items() if k != "step"), "whole": whole}
with open(f"{out_dir}/rank{ctx.rank}.json", "w") as f:
    f.write(json.dumps(held))
distributed.close()
