"""Two gloo ranks, 2 micro batches per step: records the storages of the gradients between the
micro steps (under no_sync) and after each step. Usage: ddp_bucket_views.py OUT_DIR"""
import json
import sys

import environment  # noqa: F401
import torch

import distributed
from model import GPT, GPTConfig, MODEL_PRESETS
from train_gpt2 import StepSpec, train_step

out_dir = sys.argv[1]
ctx = distributed.setup("cpu")
torch.manual_seed(0)
raw = GPT(GPTConfig(block_size=16, **MODEL_PRESETS["d2"]))
model = distributed.wrap_ddp(raw, ctx, bucket_cap_mb=1)
optimizer = raw.configure_optimizer(0.1, 1e-3)


def storages():
    return sorted({p.grad.untyped_storage().data_ptr() for p in raw.parameters()})


seen = []


class Loader:
    calls = 0

    def next_batch(self):
        Loader.calls += 1
        if Loader.calls % 2 == 0:  # the second micro step: the first one's gradients are in place
            seen.append(storages())
        g = torch.Generator().manual_seed(Loader.calls * 2 + ctx.rank)
        return torch.randint(0, 50257, (2, 16), generator=g), torch.randint(0, 50257, (2, 16), generator=g)


scaler = torch.amp.GradScaler("cpu", enabled=False)
spec = StepSpec(2, 1.0, torch.device("cpu"), "fp32", "ddp")
for step in range(3):
    train_step(model, optimizer, scaler, Loader(), 1e-3, spec)
    seen.append(storages())
grads = torch.cat([p.grad.flatten() for p in raw.parameters()])
other = distributed.from_rank0(grads.clone())
result = dict(seen=seen, params=sum(1 for _ in raw.parameters()), same=bool(torch.equal(grads, other)))
with open(f"{out_dir}/rank{ctx.rank}.json", "w") as f:
    f.write(json.dumps(result))
del model
distributed.close()
