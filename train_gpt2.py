"""GPT-2 pretraining: the model, the command line and one readable training loop.

    python train_gpt2.py                                   # embedded default: tiny Shakespeare, sized to the device
    python train_gpt2.py --data_root data/edu_fineweb10B --model gpt2 --auto_resume
    torchrun --nproc_per_node=4 train_gpt2.py --data_root data/edu_fineweb10B

Side concerns live in small modules, each one call from the loop: devices (device.py),
data (dataloader.py), checkpoints (checkpoint.py), HellaSwag (hellaswag.py).
"""
import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import device as device_mod  # before torch: it sets environment variables torch reads when it loads
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

import checkpoint
import dataloader
import gpt2_hf
import hellaswag
import kernels
import metrics as metrics_mod

# -----------------------------------------------------------------------------
# The model: GPT-2 exactly, with GPT-2's parameter names so weights map to and
# from OpenAI's checkpoints (transformer.wte, transformer.h.0.attn.c_attn, ...).


@dataclass
class GPTConfig:
    block_size: int = 1024   # longest sequence the position table covers
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 128: faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


GPT2_VOCAB_SIZE = 50257

MODEL_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),          # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),      # 1558M
    # Small shapes for CPUs and laptops; same architecture, GPT-2 vocabulary.
    "d12": dict(n_layer=12, n_head=12, n_embd=768),
    "d6": dict(n_layer=6, n_head=6, n_embd=384),
    "d4": dict(n_layer=4, n_head=4, n_embd=256),
    "d2": dict(n_layer=2, n_head=2, n_embd=128),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash / cuDNN kernels where available
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # pre-LN: normalise the input of each branch
        x = x + self.mlp(self.ln_2(x))
        return x


def matmul_dtype(device_type, dtype):
    """The dtype a matmul runs in here: autocast's when it is on, else the tensors' own."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight.T against targets, a chunk of rows at a time,
    with the gradients of x and weight worked out in the same pass when they are needed.

    The same math as F.cross_entropy(lm_head(x).float(), targets): logits rounded to the matmul
    dtype (bf16 under autocast), softmax in fp32, padding columns of the vocabulary masked as in
    GPT.forward. But the full logits never exist: for 64 x 1024 tokens they are 6.6 GB in bf16,
    and 6.6 GB more for their gradient. The backward pass only scales the stored gradients.
    It saves memory, not time: 1.7% slower compiled, 14% eager, on an H100 (docs/PERFORMANCE.md).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows, compute_dtype):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        rows_total = x.size(0)
        xc, wc = x.to(compute_dtype), weight.to(compute_dtype)
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(xc) if needs_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        for start in range(0, rows_total, chunk_rows):
            x_chunk, t_chunk = xc[start:start + chunk_rows], targets[start:start + chunk_rows]
            logits = (x_chunk @ wc.t()).float()
            logits[:, GPT2_VOCAB_SIZE:] = float("-inf")  # padding rows are never tokens (see GPT.forward)
            lse = torch.logsumexp(logits, dim=1, keepdim=True)
            loss_sum = loss_sum + (lse.squeeze(1) - logits.gather(1, t_chunk[:, None]).squeeze(1)).sum()
            if needs_grad:
                # d(mean loss)/d(logits) = (softmax - one_hot(target)) / rows_total
                dlogits = (logits - lse).exp().scatter_add(1, t_chunk[:, None], logits.new_full((len(t_chunk), 1), -1.0))
                dlogits = (dlogits / rows_total).to(compute_dtype)
                grad_x[start:start + chunk_rows] = dlogits @ wc
                grad_w += (dlogits.t() @ x_chunk).float()
        ctx.save_for_backward(grad_x, grad_w)
        ctx.dtypes = (x.dtype, weight.dtype)
        return loss_sum / rows_total

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        return (grad_x * grad_loss).to(x_dtype), (grad_w * grad_loss).to(w_dtype), None, None, None


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings
        self.apply(self._init_weights)
        # Recompute each block's activations in the backward pass instead of storing them:
        # about a third more compute for much less memory. A run-time choice, not part of the shape.
        self.activation_checkpointing = False
        # Rows of logits the loss works on at a time; 0 materialises all B*T x vocab logits first.
        self.loss_chunk_rows = 0
        # The loss in Triton kernels (kernels.py, CUDA): its gradient overwrites the logits, no second buffer.
        self.fused_loss = False

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                # Each block adds two projections to the residual stream: scale them
                # so its variance does not grow with depth (GPT-2 paper, section 2.3).
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None):
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} tokens > block size {self.config.block_size}"
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None and self.loss_chunk_rows:
            # Training and validation: the loss without the full logits (see LinearCrossEntropy).
            loss = LinearCrossEntropy.apply(x.view(B * T, -1), self.lm_head.weight, targets.view(-1),
                                            self.loss_chunk_rows, matmul_dtype(x.device.type, x.dtype))
            return None, loss
        logits = self.lm_head(x)
        if targets is not None and self.fused_loss:
            # The logits are not returned: after backward() they hold their gradient (kernels.py).
            return None, kernels.cross_entropy(logits, targets, min(GPT2_VOCAB_SIZE, logits.size(-1)))
        # Padding rows of the vocabulary are never tokens: no probability for them, whatever their weights
        # (zeros for OpenAI's weights, which would otherwise get logit 0, far above real tokens' logits).
        logits[..., GPT2_VOCAB_SIZE:] = float("-inf")
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))
        return logits, loss

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6N for the matmuls with weights (forward + backward)
        plus 12 * n_layer * n_embd * T for attention scores and their weighted sum."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * seq_len

    def configure_optimizer(self, weight_decay, learning_rate, device_type):
        """AdamW with decay on 2-D tensors (matmul weights, embeddings) only; biases and
        LayerNorm gains are not decayed. The fused kernel exists for CUDA, MPS and (since torch 2.4)
        CPU, where it measured 16x faster than the for-each one on a d4 model."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        try:
            return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=True)
        except (RuntimeError, TypeError):
            print(f"fused AdamW is not available on {device_type}; using the for-each implementation")
            return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None):
        """Sample max_new_tokens after idx (B, T); top-k sampling, seeded by generator."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float() / max(temperature, 1e-5)
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
        return idx


# -----------------------------------------------------------------------------
# Settings. Every tunable flag defaults to None so we can tell an explicit flag from
# a default; values are then filled from the recipe, then the device preset. The
# effective configuration and where each value came from is printed once at start.

# GPT-2 124M on FineWeb-Edu 10B tokens, the build-nanogpt / llm.c recipe.
RECIPE = dict(
    model="gpt2", seq_len=1024, total_batch_size=524288, max_steps=19073, warmup_steps=715,
    max_lr=6e-4, min_lr=6e-5, weight_decay=0.1, grad_clip=1.0, eval_interval=250, eval_steps=20,
    checkpoint_interval=5000, generate_interval=0, log_interval=1,
)
# Without --data_root: tiny Shakespeare, sized so a first run shows the loss fall and a sample in minutes.
QUICKSTART = {
    # compile off: 300 eager steps take ~17 s on an H100 (docs/PERFORMANCE.md), less than compiling GPT-2
    "cuda": dict(model="gpt2", seq_len=1024, micro_batch_size=16, total_batch_size=16384, max_steps=300,
                 warmup_steps=30, max_lr=6e-4, min_lr=6e-5, eval_interval=50, eval_steps=2, checkpoint_interval=300,
                 compile="none"),
    "mps": dict(model="d6", seq_len=256, micro_batch_size=16, total_batch_size=4096, max_steps=500,
                warmup_steps=30, max_lr=1e-3, min_lr=1e-4, eval_interval=50, eval_steps=4, checkpoint_interval=500),
    # LR 1e-3 -> 2e-4: at 2e-3 the loss spiked at step 22 (6.25 -> 7.64) and val loss was higher at
    # every eval; 1e-3 -> 1e-4 ended 0.06 above this (docs/RESULTS.md)
    "cpu": dict(model="d4", seq_len=64, micro_batch_size=8, total_batch_size=512, max_steps=300,
                warmup_steps=20, max_lr=1e-3, min_lr=2e-4, eval_interval=50, eval_steps=4, checkpoint_interval=300),
}
DEFAULT_DATA_ROOT = os.path.join("data", "tinyshakespeare")
DDP_BUCKET_CAP_MB = 25.0  # PyTorch's default all-reduce bucket size; --ddp_bucket_cap_mb


def micro_batch_size_arg(text):
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive number of sequences nor auto")
    return int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="GPT-2 pretraining. With no arguments: prepares tiny Shakespeare and trains a model sized to this device.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and output")
    g.add_argument("--data_root", default=None,
                   help=f"folder of <name>_{{train,val}}_NNNNNN.npy uint16 token shards (default: {DEFAULT_DATA_ROOT}, prepared on first use)")
    g.add_argument("--log_dir", default="log", help="where metrics.jsonl and checkpoints are written")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, choices=sorted(MODEL_PRESETS), help="model preset (default: gpt2, or a small one for the quickstart)")
    g.add_argument("--n_layer", type=int, default=None, help="override the preset's number of layers")
    g.add_argument("--n_head", type=int, default=None, help="override the preset's attention heads")
    g.add_argument("--n_embd", type=int, default=None, help="override the preset's width")
    g.add_argument("--block_size", type=int, default=1024, help="longest sequence the model can take (position table size), tokens")
    g.add_argument("--init_from", default=None, metavar="NAME|DIR",
                   help="start from pretrained weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl (OpenAI's, via "
                        "pip install transformers) or a save_pretrained folder; they set the model shape")
    g = p.add_argument_group("batch and schedule")
    g.add_argument("--total_batch_size", type=int, default=None, help="tokens per optimizer step over all ranks (default 524288 = 2**19)")
    g.add_argument("--micro_batch_size", type=micro_batch_size_arg, default=None,
                   help="sequences per forward pass per rank, or auto: the largest that fits the GPU, probed at start (default: device preset)")
    g.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default 1024)")
    g.add_argument("--max_steps", type=int, default=None, help="optimizer steps in the run (default 19073: 10B tokens at 2**19)")
    g.add_argument("--warmup_steps", type=int, default=None, help="linear LR warm-up, steps (default 715)")
    g.add_argument("--max_lr", type=float, default=None, help="peak learning rate (default 6e-4)")
    g.add_argument("--min_lr", type=float, default=None, help="final learning rate of the cosine decay (default max_lr/10)")
    g.add_argument("--weight_decay", type=float, default=None, help="AdamW weight decay on 2-D weights (default 0.1)")
    g.add_argument("--grad_clip", type=float, default=None, help="clip the global gradient norm to this; 0 disables (default 1.0)")
    g.add_argument("--seed", type=int, default=1337, help="seed for init, data order is fixed by the shards")
    g = p.add_argument_group("device")
    g.add_argument("--preset", default="auto", choices=device_mod.DEVICE_CHOICES,
                   help="per-device defaults for micro batch, dtype, compile, pin_memory (device.PRESETS; auto: the device's); flags win")
    device_mod.add_device_arguments(g, dtype_default=None)
    g.add_argument("--compile", nargs="?", const="default", default=None,
                   help="torch.compile the model; optional mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs, "
                        "none. A mode that fails falls back to default, then eager (default: device preset)")
    g.add_argument("--num_threads", type=int, default=None, help="CPU threads for torch (default: torch's choice, one per physical core)")
    g.add_argument("--pin_memory", action=argparse.BooleanOptionalAction, default=None,
                   help="page-locked host batches for faster, asynchronous copies to the GPU (default: on for CUDA)")
    g.add_argument("--mps_memory_fraction", type=float, default=None,
                   help="Apple MPS: cap this process at this fraction of the GPU's recommended working set, 0..2 "
                        "(default: PYTORCH_MPS_HIGH_WATERMARK_RATIO, 1.0 unless you set it)")
    g.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute activations in the backward pass: ~1/3 more compute, far less memory (off: speed first)")
    g.add_argument("--loss_chunk_rows", type=int, default=0, metavar="ROWS",
                   help="compute the loss ROWS token positions at a time, never holding all B*T x vocab logits; for "
                        "where --fused_loss cannot run: gpt2 at 64 x 1024 on an H100 peaks at 25.8 instead of 40.8 GiB "
                        "with PyTorch's loss, 1.7%% slower compiled, 14%% slower eager (0: off; try 8192)")
    g.add_argument("--ddp_bucket_cap_mb", type=float, default=DDP_BUCKET_CAP_MB, metavar="MB",
                   help="DDP: gradient MB per all-reduce bucket; smaller buckets start communicating sooner, larger ones send fewer messages (25 is PyTorch's default)")
    g.add_argument("--fused_loss", choices=["auto", "on", "off"], default="auto",
                   help="the loss in Triton kernels whose gradient overwrites the logits: no second B*T x vocab buffer "
                        "(auto: on for CUDA with Triton, unless --loss_chunk_rows is set)")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval_interval", type=int, default=None, help="validation loss every N steps, and at the last step (default 250)")
    g.add_argument("--eval_steps", type=int, default=None, help="validation batches of --total_batch_size tokens each, the same tokens at any world size (default 20)")
    g.add_argument("--hellaswag_interval", type=int, default=0,
                   help="HellaSwag accuracy every N steps and at the last step, into metrics.jsonl; 0: off")
    g.add_argument("--hellaswag_file", default=None,
                   help="local hellaswag_val.jsonl (default: download it once into $HELLASWAG_CACHE_DIR or "
                        f"{hellaswag.DEFAULT_CACHE_DIR})")
    g.add_argument("--hellaswag_limit", type=hellaswag.positive_int, default=None,
                   help="score only the first N HellaSwag examples (default: all 10042)")
    g.add_argument("--log_interval", type=int, default=None,
                   help="print a step line (and time data/fwd_bwd/optim) every N steps; metrics.jsonl gets every step (default 1)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write the metrics to <log_dir>/tensorboard (needs: pip install tensorboard)")
    g.add_argument("--generate_interval", type=int, default=None, help="print samples every N steps; 0: only at the end (default 0)")
    g.add_argument("--prompt", default="\n", help="prompt for samples")
    g.add_argument("--num_samples", type=int, default=2, help="samples printed each time")
    g.add_argument("--max_new_tokens", type=int, default=64, help="tokens per sample")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint_interval", type=int, default=None, help="save every N steps and at the last step; 0: only at the end (default 5000)")
    g.add_argument("--auto_resume", "--auto-resume", action="store_true", help="resume from the newest valid checkpoint in --log_dir if there is one")
    g.add_argument("--resume", action="store_true", help="resume from --checkpoint_path")
    g.add_argument("--checkpoint_path", default=None, help="checkpoint file for --resume")
    g.add_argument("--resume_from_checkpoint", default=None, metavar="PATH", help="same as --resume --checkpoint_path PATH")
    g.add_argument("--keep_last_n_checkpoints", type=int, default=-1, help="delete older step checkpoints beyond N; -1 keeps all")
    g.add_argument("--save_optimizer", default="all", choices=["all", "latest"],
                   help="optimizer state in every checkpoint, or only the newest (older ones keep weights only)")
    g.add_argument("--async_checkpoint", action="store_true", help="write checkpoints in a background thread")
    g.add_argument("--no_load_optimizer", "--reset_optimizer", dest="no_load_optimizer", action="store_true",
                   help="resume the weights only, with a fresh optimizer (fine-tuning, changed learning rate)")
    args = p.parse_args(argv)
    if args.resume_from_checkpoint:
        args.resume, args.checkpoint_path = True, args.resume_from_checkpoint
    return args


def resolve_settings(args, device_type):
    """Fill every None flag from the quickstart or recipe, then the device preset.
    Returns {name: (value, source)} for the table printed at start."""
    preset_name = device_type if args.preset == "auto" else args.preset
    quickstart = args.data_root is None
    layers = [("preset:" + preset_name, device_mod.PRESETS[preset_name])]
    layers.append(("quickstart:" + device_type, QUICKSTART[device_type]) if quickstart else ("recipe", RECIPE))
    sources = {}
    for name in ("data_root", "model", "total_batch_size", "micro_batch_size", "seq_len", "max_steps", "warmup_steps",
                 "max_lr", "min_lr", "weight_decay", "grad_clip", "dtype", "compile", "pin_memory", "num_threads",
                 "eval_interval", "eval_steps", "log_interval", "generate_interval", "checkpoint_interval"):
        value, source = getattr(args, name), "flag"
        if value is None:
            for layer_name, layer in reversed(layers):  # quickstart/recipe first: they know the run's shape
                if name in layer:
                    value, source = layer[name], layer_name
                    break
        if value is None:
            defaults = {"data_root": DEFAULT_DATA_ROOT, "min_lr": None, "pin_memory": False, "num_threads": torch.get_num_threads()}
            value, source = defaults.get(name, RECIPE.get(name)), "default"
        setattr(args, name, value)
        sources[name] = source
    if args.min_lr is None:
        args.min_lr, sources["min_lr"] = args.max_lr * 0.1, "max_lr/10"
    if args.init_from:  # the weights set the shape
        if sources["model"] == "flag" or any(getattr(args, k) is not None for k in ("n_layer", "n_head", "n_embd")):
            raise UserError("--init_from takes the model shape from the weights; drop --model, --n_layer, "
                            "--n_head and --n_embd")
        args.model, sources["model"] = args.init_from, "init_from"
    return {name: (getattr(args, name), src) for name, src in sources.items()}


def print_settings(settings, extra):
    width = max(len(k) for k in list(settings) + list(extra))
    print("effective configuration (value, where it came from):")
    for name, (value, source) in settings.items():
        print(f"  {name:<{width}}  {value!s:<24} {source}")
    for name, value in extra.items():
        print(f"  {name:<{width}}  {value!s:<24} derived")


def build_model_config(args):
    if args.init_from:
        return gpt2_hf.gpt_config(args.init_from, args.block_size)
    shape = dict(MODEL_PRESETS[args.model])
    for key in ("n_layer", "n_head", "n_embd"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    if shape["n_embd"] % shape["n_head"]:
        raise UserError(f"--n_embd {shape['n_embd']} is not divisible by --n_head {shape['n_head']}; pick sizes where it is")
    return GPTConfig(block_size=args.block_size, **shape)


class UserError(Exception):
    """A mistake in the command line; printed as one line, exit status 1."""


def get_lr(step, args):
    """Linear warm-up to max_lr, then cosine decay to min_lr at max_steps."""
    if step < args.warmup_steps:
        return args.max_lr * (step + 1) / args.warmup_steps
    if step >= args.max_steps:
        return args.min_lr
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.max_lr - args.min_lr)


# -----------------------------------------------------------------------------
# Distributed set-up: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them, one process.


@dataclass
class Dist:
    enabled: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self):
        return self.rank == 0


def init_distributed(device_type):
    if "RANK" not in os.environ:
        return Dist()
    ddp = Dist(True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if device_type == "cuda":
        torch.cuda.set_device(ddp.local_rank)
        # Bound to its GPU: NCCL then neither guesses the device from the rank (it warned so on the
        # H100) nor waits for the first collective to set up.
        dist.init_process_group(backend="nccl", device_id=torch.device("cuda", ddp.local_rank))
    else:
        dist.init_process_group(backend="gloo")
    return ddp


def close_distributed():
    """Leave the process group so that no rank aborts at exit. Every rank first finishes
    communicating (the barrier). Then, on gloo, the main thread waits a moment without the GIL:
    gloo's worker threads free each finished collective's tensors, which takes the GIL, and a
    worker still doing so when the interpreter shuts down aborts the process ('terminate called
    without an active exception': 5 of 25 two-rank CPU runs of a HellaSwag script, 1 of 1 CI
    run of it with the barrier alone)."""
    gloo = dist.get_backend() == "gloo"
    dist.barrier()
    if gloo:
        time.sleep(0.2)
    dist.destroy_process_group()


def wrap_ddp(model, ddp, device_type, bucket_cap_mb, bucket_view=True):
    """DDP whose gradients are views into its all-reduce buckets (bucket_view): no second fp32
    copy of the gradients (one more model-sized buffer otherwise, 0.5 GB for 124M, 6.2 GB for
    1.5B). train_step zeroes them in place so they stay views, also through no_sync accumulation.
    bucket_view=False is PyTorch's default, kept for scripts/benchmark.py to compare."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[ddp.local_rank] if device_type == "cuda" else None,
               bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=bucket_view)


@torch.no_grad()
def evaluate_loss(model, loader, steps, device, dtype, ddp):
    """Mean validation loss over `steps` micro batches per rank, from the start of the val split.
    The caller scales steps by the accumulation steps, so every world size sees the same tokens."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with device_mod.autocast(device.type, dtype):
            _, loss = model(x, y)
        total += loss.detach()
    total /= steps
    if ddp.enabled:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    model.train()
    return total.item()


def sample_texts(model, enc, prompt, num_samples, max_new_tokens, device, dtype, temperature=1.0, top_k=50, seed=0):
    """num_samples continuations of prompt, drawn with one generator seeded by seed: the same seed gives
    the same texts on the same device. Pass the raw model, not a compiled one: every new length
    would recompile. The model is left in the mode it was in. scripts/sample.py uses this too."""
    tokens = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [dataloader.EOT_TOKEN]
    idx = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(0).repeat(num_samples, 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    with device_mod.autocast(device.type, dtype):
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    model.train(was_training)
    return [enc.decode(row[len(tokens):].tolist()) for row in out]


def print_samples(model, enc, args, device, dtype, step, ddp):
    """Top-k samples from --prompt; seeded per rank and step so a resumed run prints the same."""
    texts = sample_texts(model, enc, args.prompt, args.num_samples, args.max_new_tokens, device, dtype,
                         seed=args.seed + 1000 * ddp.rank + step)
    for i, text in enumerate(texts):
        print(f"[rank {ddp.rank}] sample {i} at step {step}: {args.prompt!r} -> {text!r}")


# -----------------------------------------------------------------------------
# The training step and loop.


def train_step(model, optimizer, scaler, loader, grad_accum_steps, lr, grad_clip, device, dtype, ddp, timer=None):
    """One optimizer step over grad_accum_steps micro batches; returns (mean loss, grad norm) as
    device tensors without waiting for the GPU. scripts/benchmark.py times this same function.
    timer (metrics.StepTimer) marks where the data, forward+backward and optimizer phases end."""
    timer = timer or metrics_mod.StepTimer(enabled=False)
    timer.start()
    optimizer.zero_grad(set_to_none=not ddp.enabled)  # DDP: in place, the gradients stay views into its buckets
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(grad_accum_steps):
        x, y = loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        timer.mark("data")
        # DDP all-reduces gradients only on the last micro step of the accumulation.
        sync = not ddp.enabled or micro_step == grad_accum_steps - 1
        with (contextlib.nullcontext() if sync else model.no_sync()):
            with device_mod.autocast(device.type, dtype):
                _, loss = model(x, y)
            loss = loss / grad_accum_steps  # the gradient of the mean over the whole token batch
            loss_accum += loss.detach()
            scaler.scale(loss).backward()
        timer.mark("fwd_bwd")
    if ddp.enabled:
        dist.all_reduce(loss_accum, op=dist.ReduceOp.AVG)
    scaler.unscale_(optimizer)  # no-op unless fp16: clip the true gradients
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.step(optimizer)
    scaler.update()
    timer.mark("optim")
    return loss_accum, norm


def probe_micro_batch_size(args, model_config, device, dtype, ddp, log):
    """--micro_batch_size auto: the largest micro batch that fits (the same on every rank); the
    accumulation steps then make up --total_batch_size."""
    sequences_per_rank = args.total_batch_size // (args.seq_len * ddp.world_size)
    if sequences_per_rank < 1 or args.total_batch_size % (args.seq_len * ddp.world_size):
        raise UserError(f"--total_batch_size {args.total_batch_size} is not a multiple of seq_len * world_size = "
                        f"{args.seq_len} * {ddp.world_size}; --micro_batch_size auto needs whole sequences per rank")

    micro_batch_size, line = device_mod.auto_micro_batch_size(lambda: apply_run_options(GPT(model_config), args),
                                                              sequences_per_rank * args.seq_len, args.seq_len, device, dtype)
    log(line)
    return micro_batch_size


def apply_run_options(model, args):
    """Run-time choices that change how the model computes, not what: not part of its shape or checkpoints."""
    model.activation_checkpointing = args.activation_checkpointing
    model.loss_chunk_rows = args.loss_chunk_rows
    model.fused_loss = args.fused_loss == "on"
    return model


def resolve_fused_loss(args, device, log):
    """--fused_loss auto -> on or off (one line says which and why); on where it cannot run -> UserError."""
    usable, why_not = kernels.available(device)
    if args.fused_loss == "on" and not usable:
        raise UserError(f"--fused_loss on: {why_not}; use --fused_loss off")
    if args.fused_loss == "on" and args.loss_chunk_rows:
        raise UserError("--fused_loss on and --loss_chunk_rows are two ways to compute the loss; drop one of them")
    if args.fused_loss == "auto":
        args.fused_loss = "on" if usable and not args.loss_chunk_rows else "off"
        if args.fused_loss == "on":
            log("loss: Triton kernels, the gradient overwrites the logits (--fused_loss auto on CUDA)")
        else:
            log(f"loss: {'chunked' if args.loss_chunk_rows else 'PyTorch cross-entropy'} (--fused_loss auto: "
                f"{'--loss_chunk_rows is set' if args.loss_chunk_rows else why_not})")


def train(args):
    device_type = device_mod.select_device(args.device)
    ddp = init_distributed(device_type)
    device = device_mod.torch_device(device_type, ddp.local_rank)
    log = print if ddp.master else (lambda *a, **k: None)
    settings = resolve_settings(args, device_type)
    dtype = device_mod.resolve_dtype(device_type, args.dtype)
    for line in device_mod.apply_device_settings(device_type, args.num_threads, args.mps_memory_fraction):
        log(line)

    model_config = build_model_config(args)
    if args.seq_len > model_config.block_size:
        raise UserError(f"--seq_len {args.seq_len} is longer than the model's block size {model_config.block_size}; "
                        f"use --seq_len {model_config.block_size} or less, or raise --block_size")
    if args.ddp_bucket_cap_mb <= 0:
        raise UserError(f"--ddp_bucket_cap_mb {args.ddp_bucket_cap_mb} is not positive; use PyTorch's 25, or a size such as 100")
    if args.loss_chunk_rows < 0:
        raise UserError(f"--loss_chunk_rows {args.loss_chunk_rows} is negative; use 0 (off) or a row count such as 8192")
    resolve_fused_loss(args, device, log)
    if args.micro_batch_size == "auto":
        args.micro_batch_size = probe_micro_batch_size(args, model_config, device, dtype, ddp, log)
        settings["micro_batch_size"] = (args.micro_batch_size, f"auto ({settings['micro_batch_size'][1]})")
    tokens_per_micro_step = args.micro_batch_size * args.seq_len * ddp.world_size
    if args.total_batch_size % tokens_per_micro_step:
        raise UserError(
            f"--total_batch_size {args.total_batch_size} is not a multiple of micro_batch_size * seq_len * world_size = "
            f"{args.micro_batch_size} * {args.seq_len} * {ddp.world_size} = {tokens_per_micro_step}; "
            f"use a multiple such as {max(1, args.total_batch_size // tokens_per_micro_step) * tokens_per_micro_step}")
    grad_accum_steps = args.total_batch_size // tokens_per_micro_step
    if ddp.master:
        os.makedirs(args.log_dir, exist_ok=True)
        print_settings(settings, {"device": f"{device} x {ddp.world_size}", "precision": dtype,
                                  "grad_accum_steps": grad_accum_steps, "model_shape": asdict(model_config)})

    # Data: the quickstart prepares tiny Shakespeare once (rank 0), everyone else waits.
    if args.data_root == DEFAULT_DATA_ROOT and ddp.master:
        dataloader.ensure_tinyshakespeare(args.data_root)
    if ddp.enabled:
        dist.barrier()
    train_loader = dataloader.ShardedDataLoader(args.data_root, "train", args.micro_batch_size, args.seq_len,
                                                ddp.rank, ddp.world_size, pin_memory=args.pin_memory)
    val_loader = dataloader.ShardedDataLoader(args.data_root, "val", args.micro_batch_size, args.seq_len,
                                              ddp.rank, ddp.world_size, pin_memory=args.pin_memory,
                                              prefetch=False)  # each evaluation starts with reset(): nothing to read ahead

    torch.manual_seed(args.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    model = (gpt2_hf.from_pretrained(args.init_from, model_config) if args.init_from else GPT(model_config)).to(device)
    apply_run_options(model, args)
    raw_model = model
    log(f"model: {args.model} {model.num_params() / 1e6:.2f}M parameters (without position embeddings)")
    optimizer = raw_model.configure_optimizer(args.weight_decay, args.max_lr, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "fp16"))

    ckpt = checkpoint.CheckpointManager(
        args.log_dir, raw_model, optimizer, train_loader, model_config=asdict(model_config), run_args=vars(args),
        interval=args.checkpoint_interval, keep_last_n=args.keep_last_n_checkpoints,
        save_optimizer=args.save_optimizer, async_save=args.async_checkpoint, ddp=ddp, scaler=scaler)
    start_step = ckpt.resume(auto=args.auto_resume, path=args.checkpoint_path if args.resume else None,
                             load_optimizer=not args.no_load_optimizer)
    # torch.compile down the fallback chain, each mode checked on one micro batch (under DDP, as trained).
    wrap = (lambda m: wrap_ddp(m, ddp, device_type, args.ddp_bucket_cap_mb)) if ddp.enabled else None
    model, compile_mode = device_mod.compile_model(
        model, device_type, args.compile, wrap=wrap,
        trial=lambda m: device_mod.forward_backward(m, args.micro_batch_size, args.seq_len, device, dtype))
    metrics = metrics_mod.Metrics(
        args.log_dir, enabled=ddp.master, device_type=device_type, start_step=start_step, total_steps=args.max_steps,
        log_interval=args.log_interval, tokens_per_step=args.total_batch_size, world_size=ddp.world_size,
        flops_per_token=raw_model.flops_per_token(args.seq_len),
        peak_flops=device_mod.peak_flops(device, dtype),  # None where unknown: no MFU rather than a wrong one
        tensorboard=args.tensorboard)
    hellaswag_eval = hellaswag.TrainingEval(args.hellaswag_interval, args.hellaswag_file, args.hellaswag_limit,
                                            device, dtype, ddp.rank, ddp.world_size)
    enc = dataloader.get_tokenizer()

    val_loss = None
    with checkpoint.GracefulStop() as stop:  # SIGTERM / Ctrl-C: finish the step, save, stop; handlers restored after
        for step in range(start_step, args.max_steps):
            last_step = step == args.max_steps - 1
            t0 = time.perf_counter()
            lr = get_lr(step, args)
            loss, norm = train_step(model, optimizer, scaler, train_loader, grad_accum_steps, lr, args.grad_clip,
                                    device, dtype, ddp, timer=metrics.timer)
            # The step's one host sync, for loss and norm together. It waits for the backward pass and the
            # clipping; the optimizer kernels queued after them finish within the next step's time.
            train_loss, norm = torch.stack([loss.float(), norm.float()]).tolist()
            dt = time.perf_counter() - t0
            if not math.isfinite(train_loss):
                raise checkpoint.NonFiniteLoss(step, train_loss, ckpt.latest_path())
            metrics.log_step(step, dt, loss=train_loss, lr=lr, norm=norm, **device_mod.memory_stats(device))

            val_loss = None
            if (args.eval_interval > 0 and step % args.eval_interval == 0) or last_step:
                val_loss = evaluate_loss(model, val_loader, args.eval_steps * grad_accum_steps, device, dtype, ddp)
                metrics.log(step, val_loss=val_loss)
            if hellaswag_eval.due(step, last_step):
                metrics.log(step, **hellaswag_eval.run(model))
            if args.generate_interval > 0 and step > 0 and step % args.generate_interval == 0:
                print_samples(raw_model, enc, args, device, dtype, step, ddp)
            stopping = stop.agreed(ddp)
            ckpt.maybe_save(step, train_loss=train_loss, val_loss=val_loss, force=last_step or stopping)
            if stopping:
                log(f"stopped by {stop.signal_name} after step {step}; resume with --auto_resume")
                break
        else:
            if start_step < args.max_steps and ddp.master:
                print_samples(raw_model, enc, args, device, dtype, args.max_steps - 1, ddp)
    ckpt.close()
    metrics.close()
    if ddp.enabled:
        # Free DDP before the process group, or a rank can hang at exit. DDP's Reducer holds the group
        # and is freed holding the GIL; were its reference the last, ~ProcessGroupGloo would wait for
        # gloo's worker threads while one of them, freeing ckpt.close()'s broadcast and its tensors,
        # waits for the GIL. Freed in this order, destroy_process_group() drops the last reference with
        # the GIL released and the workers finish.
        del model
        close_distributed()
    return val_loss


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (UserError, dataloader.DataError, device_mod.DeviceError, checkpoint.CheckpointError,
            metrics_mod.MetricsError, hellaswag.HellaSwagError, gpt2_hf.HFError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as exc:  # torch.OutOfMemoryError, or MPS's RuntimeError saying so
        if not device_mod.is_oom(exc):
            raise
        device = torch.device(device_mod.select_device(args.device))
        print(f"error: {device_mod.oom_message(device, args.micro_batch_size, args.seq_len, args.activation_checkpointing)}",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
