#!/usr/bin/env python3
"""The loss alone: triton_loss.cross_entropy (Triton) against F.cross_entropy, values, gradients and speed.

    python -m scripts.bench_loss                          # 65536 x 50304 bf16 on CUDA: micro batch 64 of GPT-2 124M
    python -m scripts.bench_loss --rows 8192 --blocks 2048:8 4096:8 4096:16

First a check on --check_rows rows (loss and gradient against PyTorch's fp32 loss with the same
padding mask), then forward + backward timed for each BLOCK_COLS:NUM_WARPS of the Triton kernels,
and for PyTorch's loss eager and compiled, with the memory each takes beyond the logits.
"""
import statistics
import sys

if __name__ == "__main__" and not __package__:  # started as a path: say the command that works, exit 2
    from _as_module import exit_with_module_command  # scripts/ is sys.path[0] here; it imports nothing of ours
    exit_with_module_command(__file__)

import environment  # noqa: E402,F401  before torch: it sets variables torch reads when it loads
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cli  # noqa: E402
import triton_loss  # noqa: E402
from model import GPTConfig  # noqa: E402
from scripts.benchmark import seconds  # noqa: E402


def torch_loss(logits, targets, n_valid):
    logits = logits.clone()  # the model masks its own lm_head output in place; a leaf cannot be
    logits[..., n_valid:] = float("-inf")
    return F.cross_entropy(logits.float(), targets)


def median_seconds(fn, dev, repeats):
    fn()  # warm-up: compilation, autotuning
    return statistics.median(seconds(dev, fn) for _ in range(repeats))


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=65536, help="token positions (micro batch x sequence length)")
    p.add_argument("--cols", type=int, default=50304, help="logits per row (GPT-2's padded vocabulary)")
    p.add_argument("--valid_cols", type=int, default=GPTConfig.real_vocab_size, help="real tokens; the rest is padding")
    p.add_argument("--check_rows", type=int, default=8192, help="rows checked against PyTorch's fp32 loss")
    p.add_argument("--blocks", nargs="+", default=["4096:8", "2048:8", "4096:16", "8192:16"],
                   help="Triton BLOCK_COLS:NUM_WARPS configurations to time")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per row (median)")
    p.add_argument("--device", default="cuda", help="cuda; cpu works only with TRITON_INTERPRET=1 (slow: tests)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; the Triton loss is for CUDA (use --device cpu with TRITON_INTERPRET=1 to check it)")
    torch.manual_seed(0)

    rows = min(args.check_rows, args.rows)
    x = torch.randn(rows, args.cols, device=dev).mul(3).to(torch.bfloat16)
    t = torch.randint(0, args.valid_cols, (rows,), device=dev)
    reference = x.float().requires_grad_()
    expected = torch_loss(reference, t, args.valid_cols)
    expected.backward()
    source = x.clone().requires_grad_()
    loss = triton_loss.cross_entropy(source * 1, t, args.valid_cols)
    loss.backward()
    print(f"check, {rows} x {args.cols} bf16: loss {loss.item():.6f} vs PyTorch {expected.item():.6f}; gradient max abs "
          f"difference {(source.grad.float() - reference.grad).abs().max().item():.3e} (largest gradient "
          f"{reference.grad.abs().max().item():.3e}); padding gradients all zero: "
          f"{bool((source.grad[:, args.valid_cols:] == 0).all())}")

    x = torch.randn(args.rows, args.cols, device=dev).mul(2).to(torch.bfloat16)
    t = torch.randint(0, args.valid_cols, (args.rows,), device=dev)
    gigabytes = 3 * x.numel() * x.element_size() / 1e9  # the least the loss can move: read, read, write

    def forward_backward(loss_fn):
        logits = x.detach().requires_grad_()  # a leaf: its .grad is the logits' own memory
        loss_fn(logits, t, args.valid_cols).backward()

    print(f"forward + backward, {args.rows} x {args.cols} bf16 on {dev}:")
    default = triton_loss.BLOCK_COLS, triton_loss.NUM_WARPS
    for block in args.blocks:
        triton_loss.BLOCK_COLS, triton_loss.NUM_WARPS = (int(v) for v in block.split(":"))
        triton_loss._kernels = None
        s = median_seconds(lambda: forward_backward(triton_loss.cross_entropy), dev, args.repeats)
        print(f"  Triton, {triton_loss.BLOCK_COLS} columns per block, {triton_loss.NUM_WARPS} warps: {s * 1e3:8.2f} ms "
              f"({gigabytes / s:,.0f} GB/s over the {gigabytes:.1f} GB it must move)")
    triton_loss.BLOCK_COLS, triton_loss.NUM_WARPS = default
    triton_loss._kernels = None
    clone = " (includes a clone of the logits for the mask)"
    for name, fn, note in (("PyTorch eager", torch_loss, clone),
                           ("PyTorch compiled", torch.compile(torch_loss), clone),
                           (f"Triton ({default[0]}:{default[1]}, the default)", triton_loss.cross_entropy, "")):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        s = median_seconds(lambda: forward_backward(fn), dev, args.repeats)
        extra = f", +{(torch.cuda.max_memory_allocated() - base) / 2**30:.2f} GiB over the logits" if dev.type == "cuda" else ""
        print(f"  {name}: {s * 1e3:8.2f} ms{extra}{note}")


if __name__ == "__main__":
    main()
