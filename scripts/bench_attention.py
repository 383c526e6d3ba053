#!/usr/bin/env python3
"""Causal attention alone, per kernel family: forward and forward + backward time, TFLOP/s, and the
largest difference from the first family's output.

    python -m scripts.bench_attention                    # GPT-2 124M's shape: 64 x 12 heads x 1024 x 64, bf16 on CUDA
    python -m scripts.bench_attention --batch 2 --seq_len 128 --device cpu --repeats 3

q, k and v are made as the model makes them: strided views of one (B, T, 3C) projection, so the
kernels see the layout training gives them. FLOPs count the causal half of the score matrix
(forward 2 matmuls, backward 2.5 times the forward), the convention of FlashAttention's papers.
"""
import sys
import time

if __name__ == "__main__" and not __package__:  # started as a path: say the command that works, exit 2
    from _as_module import exit_with_module_command  # scripts/ is sys.path[0] here; it imports nothing of ours
    exit_with_module_command(__file__)

import environment  # noqa: E402,F401  before torch: it sets variables torch reads when it loads
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cli  # noqa: E402
import device as device_mod  # noqa: E402
from model import attention_backend  # noqa: E402

FAMILIES = ["cudnn", "flash", "efficient", "math", "flex"]


def sdpa(name):
    def attend(q, k, v):
        with attention_backend(name):  # the kernel family benchmark.py --sdpa_backend pins
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attend


def flex(seq_len, device):
    """FlexAttention with a causal block mask, compiled (uncompiled it runs a slow reference)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, seq_len, seq_len, device=device)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=mask)


def timed(fn, dev, repeats):
    """Mean seconds per fn() over repeats calls queued back to back (a wait after each call would
    add the host's latency to kernels of a fraction of a millisecond), after two untimed calls."""
    for _ in range(2):
        fn()
    device_mod.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    device_mod.synchronize(dev)
    return (time.perf_counter() - t0) / repeats


def run(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=64, help="sequences")
    p.add_argument("--heads", type=int, default=12, help="attention heads")
    p.add_argument("--seq_len", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--head_dim", type=int, default=64, help="channels per head")
    p.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES, help="kernel families, first is the reference")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measure (their mean)")
    p.add_argument("--deterministic", action="store_true",
                   help="as train_gpt2.py --deterministic: families without a deterministic backward are refused")
    device_mod.add_device_arguments(p)
    args = p.parse_args(argv)
    dev = device_mod.torch_device(device_mod.select_device(args.device))
    dtype = device_mod.DTYPES[device_mod.resolve_dtype(dev.type, args.dtype)]
    device_mod.set_deterministic(dev.type, args.deterministic)

    B, H, T, D = args.batch, args.heads, args.seq_len, args.head_dim
    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3 * H * D, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(B, H, T, D, device=dev, dtype=dtype)

    def views():
        return [t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2)]

    forward_flops = 4 * B * H * T * T * D / 2
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    print(f"causal attention, {B} x {H} heads x {T} x {D}, {dtype}, {name}, torch {torch.__version__}"
          f"{', deterministic' if args.deterministic else ''}:")
    print(f"{'family':<11}{'fwd ms':>9}{'TFLOP/s':>9}{'fwd+bwd ms':>12}{'TFLOP/s':>9}  max |diff| from the first")
    reference = None
    for family in args.families:
        try:
            attend = flex(T, dev) if family == "flex" else sdpa(family)
            with torch.no_grad():
                out = attend(*views()).float()
                reference = out if reference is None else reference
                forward = timed(lambda: attend(*views()), dev, args.repeats)

            def forward_backward():
                qkv.grad = None
                attend(*views()).backward(dy)
            both = timed(forward_backward, dev, args.repeats)
        except Exception as exc:  # a family this device or build lacks: say why, go on
            print(f"{family:<11}unavailable: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:150]}")
            continue
        diff = (out - reference).abs().max().item()
        print(f"{family:<11}{forward * 1e3:>9.3f}{forward_flops / forward / 1e12:>9.3g}{both * 1e3:>12.3f}"
              f"{3.5 * forward_flops / both / 1e12:>9.3g}  {diff:.3g}", flush=True)


def main(argv=None):
    return cli.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
