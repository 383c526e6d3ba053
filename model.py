"""The GPT-2 model, with GPT-2's parameter names so weights map to and from OpenAI's checkpoints
(transformer.wte, transformer.h.0.attn.c_attn, ...). It lifts out alone, as nanoGPT's model.py does: it
imports torch, the standard library and (where present) triton_loss.py, nothing else of this trainer; how
it computes (loss kernel, activation checkpointing, precision) reaches it as arguments.

Public API:
    GPTConfig, MODEL_PRESETS                 the shape; presets gpt2 .. gpt2-xl and small ones (d2, d4, d6)
    TIED_WEIGHTS                             {"lm_head.weight": "transformer.wte.weight"}: one tensor, two names
    config_from_dict(d) -> GPTConfig         a checkpoint's stored config (older files lack the newer fields)
    model_from_config(d, device) -> GPT      "build the model this checkpoint was trained as"
    GPT(config)                              forward(idx, targets) -> (logits, None) or (None, mean loss)
        .set_run_options(activation_checkpointing=, loss=, loss_chunk_rows=)   how it computes, not what
        .flops_per_token(T), .num_params(), .configure_optimizer(...), .generate(...)
    LOSSES                                   the ways to compute the loss: torch, chunked, fused (Triton)
    unwrap(model) -> the GPT inside torch.compile / DDP wrappers
    sample_texts(model, enc, prompt, ...)    seeded samples (the trainer and scripts/sample.py)
    attention_backend(name)                  pin scaled_dot_product_attention to one kernel family
"""
import contextlib
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

try:
    import triton_loss  # the fused loss; absent where model.py is used on its own
except ImportError:
    triton_loss = None

TIED_WEIGHTS = {"lm_head.weight": "transformer.wte.weight"}  # GPT-2 ties its output and input embeddings
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # "fp32": no autocast


class ModelConfigError(ValueError):
    """A model shape that cannot be built; the message names the field. The commands that read shapes from
    users or files turn it into their own one-line error."""


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024         # longest sequence the position table covers
    vocab_size: int = 50304        # rows of the embedding: GPT-2's 50257 padded up to a multiple of 128 (faster matmuls)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    real_vocab_size: int = 50257   # logits from here on are padding, never tokens: -inf (50304: nothing masked)
    gelu: str = "tanh"             # GPT-2's tanh approximation; "none": the exact GELU (nanoGPT's nn.GELU())

    def __post_init__(self):
        if isinstance(self.real_vocab_size, int) and isinstance(self.vocab_size, int):  # a small test vocabulary: all real
            object.__setattr__(self, "real_vocab_size", min(self.real_vocab_size, self.vocab_size))


MODEL_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),          # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),      # 1558M
    # Small shapes for CPUs and laptops; same architecture, GPT-2 vocabulary.
    "d6": dict(n_layer=6, n_head=6, n_embd=384),
    "d4": dict(n_layer=4, n_head=4, n_embd=256),
    "d2": dict(n_layer=2, n_head=2, n_embd=128),
}


def config_from_dict(d):
    """The GPTConfig of a stored config dict. Fields a file lacks (it predates them) get their
    defaults, which are what the model computed before the field existed."""
    unknown = sorted(set(d) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise ModelConfigError(f"model config {dict(d)} has fields this model does not know: {', '.join(unknown)} "
                               "(written by a newer version of this code? git pull)")
    config = GPTConfig(**d)
    problems = []
    for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "real_vocab_size"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            problems.append(f"{name} {getattr(config, name)!r} is not a positive whole number")
    if not problems and config.n_embd % config.n_head:
        problems.append(f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
    if config.gelu not in ("tanh", "none"):
        problems.append(f"gelu {config.gelu!r} is neither 'tanh' nor 'none'")
    if problems:
        raise ModelConfigError("invalid model shape: " + "; ".join(problems))
    return config


def model_from_config(d, device=None):
    """A freshly initialised GPT of a stored config dict, built on device (default CPU; "meta" for shapes only)."""
    with torch.device(device or "cpu"):
        return GPT(config_from_dict(d))


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
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash / cuDNN kernels where available
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate=config.gelu)
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


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight.T against targets, a chunk of rows at a time,
    with the gradients of x and weight worked out in the same pass when they are needed.

    The same math as F.cross_entropy(lm_head(x).float(), targets): logits rounded to the matmul
    dtype (bf16 under autocast), softmax in fp32, padding columns of the vocabulary masked as in
    GPT.loss. But the full logits never exist: for 64 x 1024 tokens they are 6.6 GB in bf16,
    and 6.6 GB more for their gradient. The backward pass only scales the stored gradients.
    It saves memory, not time (docs/PERFORMANCE.md measures both).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows, compute_dtype, real_vocab_size):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        rows_total = x.size(0)
        xc, wc = x.to(compute_dtype), weight.to(compute_dtype)
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(xc) if needs_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        for start in range(0, rows_total, chunk_rows):
            x_chunk, t_chunk = xc[start:start + chunk_rows], targets[start:start + chunk_rows]
            logits = (x_chunk @ wc.t()).float()
            logits[:, real_vocab_size:] = float("-inf")  # padding columns are never tokens (see GPT.loss)
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
        return (grad_x * grad_loss).to(x_dtype), (grad_w * grad_loss).to(w_dtype), None, None, None, None


# How the loss is computed (--fused_loss, --loss_chunk_rows): the same math, different memory.
LOSSES = ("torch", "chunked", "fused")


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
        self.set_run_options()

    def set_run_options(self, activation_checkpointing=False, loss="torch", loss_chunk_rows=0):
        """How the model computes, not what: not part of its shape or its checkpoints.
        activation_checkpointing: recompute each block's activations in the backward pass instead of
        storing them (about a third more compute for much less memory). loss: one of LOSSES;
        "chunked" works loss_chunk_rows token positions at a time (LinearCrossEntropy), "fused" runs
        the Triton kernels of triton_loss.py, whose gradient overwrites the logits."""
        if loss not in LOSSES or (loss == "chunked") != (loss_chunk_rows > 0):
            raise ValueError(f"loss {loss!r} with loss_chunk_rows {loss_chunk_rows}")
        self.activation_checkpointing = activation_checkpointing
        self.loss_kind = loss
        self.loss_chunk_rows = loss_chunk_rows
        return self

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
        """(logits, None) without targets; (None, mean cross-entropy) with them."""
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
        if targets is None:
            return self._mask_padding(self.lm_head(x)), None
        return None, self.loss(x, targets)

    def _mask_padding(self, logits):
        # Padding rows of the vocabulary are never tokens: no probability for them, whatever their weights
        # (zeros for OpenAI's weights, which would otherwise get logit 0, far above real tokens' logits).
        if self.config.real_vocab_size < logits.size(-1):
            logits[..., self.config.real_vocab_size:] = float("-inf")
        return logits

    def loss(self, x, targets):
        """Mean cross-entropy of the next-token predictions from the final hidden states x, computed
        the way set_run_options chose; the value and gradients are the same whichever way."""
        if self.loss_kind == "chunked":  # without the full logits (see LinearCrossEntropy)
            device_type = x.device.type  # its matmuls run in autocast's dtype when autocast is on, else in x's
            dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
            return LinearCrossEntropy.apply(x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1),
                                            self.loss_chunk_rows, dtype, self.config.real_vocab_size)
        logits = self.lm_head(x)
        if self.loss_kind == "fused":  # the gradient overwrites the logits (triton_loss.py)
            return triton_loss.cross_entropy(logits, targets, min(self.config.real_vocab_size, logits.size(-1)))
        logits = self._mask_padding(logits)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6N for the matmuls with weights (forward + backward)
        plus 12 * n_layer * n_embd * T for attention scores and their weighted sum."""
        return 6 * self.num_params() + 12 * self.config.n_layer * self.config.n_embd * seq_len

    def optimizer_groups(self, weight_decay):
        """AdamW's two parameter groups: decay on 2-D tensors (matmul weights, embeddings) only;
        biases and LayerNorm gains are not decayed. nanoGPT groups the same parameters in the same order."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def configure_optimizer(self, weight_decay, learning_rate):
        """AdamW over optimizer_groups, fused where the kernel exists (CUDA, MPS and, since torch 2.4,
        CPU; docs/DEVICES.md measures it against the for-each one), else for-each:
        optimizer.defaults["fused"] says which."""
        groups = self.optimizer_groups(weight_decay)
        try:
            return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=True)
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None, vocab_limit=None):
        """Sample max_new_tokens after idx (B, T); top-k sampling, seeded by generator. vocab_limit:
        never sample ids from there on (ids a tokenizer cannot decode, in a model that does not mask them)."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float() / max(temperature, 1e-5)
            if vocab_limit is not None and self.config.real_vocab_size > vocab_limit:
                logits = logits[:, :vocab_limit]
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
        return idx


def unwrap(model):
    """The GPT inside DDP's `module` and torch.compile's `_orig_mod` wrappers (FSDP2 wraps in place)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def sample_texts(model, enc, prompt, num_samples, max_new_tokens, device, dtype, temperature=1.0, top_k=50, seed=0):
    """num_samples continuations of prompt, drawn with one generator seeded by seed: the same seed gives
    the same texts on the same device. Pass the raw model, not a compiled one: every new length
    would recompile. The model is left in the mode it was in."""
    tokens = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token]
    idx = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(0).repeat(num_samples, 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    with torch.autocast(device.type, AUTOCAST_DTYPES[dtype]) if dtype in AUTOCAST_DTYPES else contextlib.nullcontext():
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                             vocab_limit=enc.n_vocab)
    model.train(was_training)
    return [enc.decode(row[len(tokens):].tolist()) for row in out]


ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


def attention_backend(name):
    """Pin scaled_dot_product_attention to one kernel family ("auto": PyTorch's choice)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel(backends[name])
