"""Stand-ins for the trainers whose checkpoints converters.py reads, written for the tests: their GPTs
as they compute (nanoGPT: exact GELU, optional biases, dropout; build-nanogpt and llm.c: tanh GELU;
no logit masking in nanoGPT and build-nanogpt, llm.c's softmax over the real vocabulary only), and
their files in their layouts (train_steps, nanogpt_checkpoint, trained_nanogpt, save_build_nanogpt, save_llmc),
and what a hostile file holds (RunsCode).
Independent of model.py, so a conversion that changes what the model computes shows up as a
different loss."""
import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class Shape:
    block_size: int = 32
    vocab_size: int = 50304
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    bias: bool = True        # nanoGPT only: False drops every Linear and LayerNorm bias
    dropout: float = 0.0     # nanoGPT only
    gelu: str = "none"       # nn.GELU's approximate: "none" (nanoGPT) or "tanh" (build-nanogpt, llm.c)
    mask_buffer: bool = False  # register the causal mask as attn.bias, as versions without flash attention do


class LayerNorm(nn.Module):
    """nanoGPT's: a LayerNorm whose bias is optional."""

    def __init__(self, n, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Attention(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.c_attn = nn.Linear(s.n_embd, 3 * s.n_embd, bias=s.bias)
        self.c_proj = nn.Linear(s.n_embd, s.n_embd, bias=s.bias)
        self.dropout, self.n_head = s.dropout, s.n_head
        self.resid_dropout = nn.Dropout(s.dropout)
        if s.mask_buffer:
            mask = torch.tril(torch.ones(s.block_size, s.block_size))
            self.register_buffer("bias", mask.view(1, 1, s.block_size, s.block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        if hasattr(self, "bias"):  # the explicit attention of GPTs without flash attention
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
            att = F.softmax(att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf")), dim=-1)
            y = F.dropout(att, self.dropout, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.c_fc = nn.Linear(s.n_embd, 4 * s.n_embd, bias=s.bias)
        self.gelu = nn.GELU(approximate=s.gelu)
        self.c_proj = nn.Linear(4 * s.n_embd, s.n_embd, bias=s.bias)
        self.dropout = nn.Dropout(s.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.ln_1 = LayerNorm(s.n_embd, s.bias)
        self.attn = Attention(s)
        self.ln_2 = LayerNorm(s.n_embd, s.bias)
        self.mlp = MLP(s)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ForeignGPT(nn.Module):
    """The GPT of nanoGPT / build-nanogpt / llm.c's train_gpt2.py, as set by its Shape."""

    def __init__(self, s, seed=0):
        super().__init__()
        self.shape = s
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(s.vocab_size, s.n_embd),
            wpe=nn.Embedding(s.block_size, s.n_embd),
            drop=nn.Dropout(s.dropout),
            h=nn.ModuleList([Block(s) for _ in range(s.n_layer)]),
            ln_f=LayerNorm(s.n_embd, s.bias),
        ))
        self.lm_head = nn.Linear(s.n_embd, s.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        # Weights of a trained model's size rather than init's std 0.02: activations of order one, where the
        # exact and tanh GELUs differ and every logit, padding rows included, moves the loss.
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                noise = torch.randn(p.shape, generator=generator)
                if p.dim() >= 2:  # matmul weights and embeddings
                    p.copy_(noise * 0.3)
                elif name.split(".")[-2].startswith("ln_") and name.endswith("weight"):  # LayerNorm gains
                    p.copy_(1 + noise * 0.1)
                else:  # biases
                    p.copy_(noise * 0.1)

    def forward(self, idx, targets=None):
        T = idx.size(1)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T)))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        # Over every logit, padding rows included: nanoGPT's and build-nanogpt's loss. llm.c's Python GPT has
        # the 50257 real tokens only (its files pad the rows), so this is also llm.c's softmax over the real ones.
        return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        """nanoGPT's AdamW: decay the parameters of 2 or more dimensions, in named_parameters order."""
        params = [p for _, p in self.named_parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def train_steps(model, optimizer, batches):
    """nanoGPT's step: forward, backward, clip at 1.0, AdamW, zero the gradients. Returns the losses."""
    model.train()
    losses = []
    for x, y in batches:
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def batch(seed, vocab=50257, B=2, T=16):
    """(inputs, targets) of B random sequences of T tokens."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, T + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def trained_nanogpt(folder, steps=2, **shape):
    """A nanoGPT model trained a few steps, and its folder/ckpt.pt: (model, its AdamW, path)."""
    model = ForeignGPT(Shape(gelu="none", **shape), seed=1)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
    train_steps(model, optimizer, [batch(10 + i, model.shape.vocab_size) for i in range(steps)])
    path = folder / "ckpt.pt"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(nanogpt_checkpoint(model, optimizer, iter_num=steps, best_val_loss=3.25), path)
    return model, optimizer, path


def nanogpt_checkpoint(model, optimizer, iter_num, best_val_loss):
    """out/ckpt.pt's dict as nanoGPT's train.py saves it from a compiled model: keys carry _orig_mod."""
    s = model.shape
    return {
        "model": {"_orig_mod." + k: v for k, v in model.state_dict().items()},  # torch.compile's wrapper's names
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "model_args": dict(n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd, block_size=s.block_size,
                           bias=s.bias, vocab_size=s.vocab_size, dropout=s.dropout),
        "iter_num": iter_num,
        "best_val_loss": torch.tensor(best_val_loss),
        "config": dict(out_dir="out", eval_interval=2000, batch_size=12, learning_rate=6e-4, weight_decay=0.1,
                       beta1=0.9, beta2=0.95, compile=True, dataset="openwebtext"),
    }


# build-nanogpt runs train_gpt2.py as a script, so its GPTConfig dataclass pickles as __main__.GPTConfig.
BUILD_NANOGPT_SAVER = '''
import json, sys
from dataclasses import dataclass
import torch

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

state_path, config_json, step, val_loss, out_path = sys.argv[1:]
state = torch.load(state_path, weights_only=True)
torch.save({"model": state, "config": GPTConfig(**json.loads(config_json)), "step": int(step),
            "val_loss": float(val_loss)}, out_path)
'''


def save_build_nanogpt(model, path, step, val_loss, tmp_path):
    """log/model_XXXXX.pt as build-nanogpt writes it, written by a script running as __main__."""
    s = model.shape
    state_path = tmp_path / "state.pt"
    torch.save(model.state_dict(), state_path)
    config = dict(block_size=s.block_size, vocab_size=s.vocab_size, n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd)
    subprocess.run([sys.executable, "-c", BUILD_NANOGPT_SAVER, str(state_path), json.dumps(config), str(step),
                    str(val_loss), str(path)], check=True, capture_output=True, text=True)
    state_path.unlink()


LLMC_ORDER = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
              "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
              "mlp.c_proj.bias"]


def save_llmc(model, path, dtype="fp32"):
    """A model file as llm.c's train_gpt2.py writes one from its 50257-token GPT: the header, then wte
    padded with zero rows to a multiple of 128, wpe, each per-layer tensor for all layers, ln_f."""
    s = model.shape
    params = dict(model.named_parameters())
    wte = params["transformer.wte.weight"]
    padded = -(-wte.size(0) // 128) * 128
    header = np.zeros(256, dtype=np.int32)
    header[:8] = [20240326, 3 if dtype == "fp32" else 5, s.block_size, wte.size(0), s.n_layer, s.n_head, s.n_embd,
                  padded]
    tensors = [F.pad(wte, (0, 0, 0, padded - wte.size(0))), params["transformer.wpe.weight"]]
    tensors += [params[f"transformer.h.{i}.{name}"] for name in LLMC_ORDER for i in range(s.n_layer)]
    tensors += [params["transformer.ln_f.weight"], params["transformer.ln_f.bias"]]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        for t in tensors:
            t = t.detach()
            bits = t.float().numpy() if dtype == "fp32" else t.bfloat16().view(torch.int16).numpy()
            f.write(bits.tobytes())


class RunsCode:
    """What a hostile file holds: pickles as a call of os.system, so loading it unsafely runs a shell command
    that creates marker."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)
