#!/usr/bin/env python3
"""Sample text from a checkpoint.

    python -m scripts.sample --checkpoint log/model_00300.pt --prompt "ROMEO:" --num_samples 3
    python -m scripts.sample --checkpoint log/best_model.pt --temperature 0.8 --top_k 200 --seed 7

Works with training checkpoints (model_*.pt, best_model.pt), exports (`python checkpoint.py export`)
and the files of nanoGPT, build-nanogpt and llm.c. Sampling is seeded: the same --seed gives the same
samples on the same device.
"""
import sys

if __name__ == "__main__" and not __package__:  # started as a path: say the command that works, exit 2
    from _as_module import exit_with_module_command  # scripts/ is sys.path[0] here; it imports nothing of ours
    exit_with_module_command(__file__)

import environment  # noqa: E402,F401  before torch: it sets variables torch reads when it loads
import torch  # noqa: E402

import checkpoint  # noqa: E402
import cli  # noqa: E402
import device as device_mod  # noqa: E402
import shards  # noqa: E402
from model import sample_texts  # noqa: E402


def run(argv=None):
    p = cli.ArgumentParser(description="Sample text from a checkpoint of train_gpt2.py.")
    p.add_argument("--checkpoint", required=True, help=checkpoint.ANY_FILE)
    p.add_argument("--prompt", default="\n", help="text the samples continue (default: a newline, the start of a document)")
    p.add_argument("--num_samples", type=cli.positive_int, default=3, help="samples to draw")
    p.add_argument("--max_new_tokens", type=cli.positive_int, default=100, help="tokens per sample")
    p.add_argument("--temperature", type=float, default=1.0, help="divide the logits by this: < 1 is more conservative")
    p.add_argument("--top_k", type=int, default=50, help="sample from the k most likely tokens; 0: all of them")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator")
    device_mod.add_device_arguments(p)
    args = p.parse_args(argv)
    if args.temperature <= 0:
        p.error(f"--temperature must be above 0, got {args.temperature}; use a small value such as 0.1 for near-greedy text")
    if args.top_k < 0:
        p.error(f"--top_k must be 0 (no limit) or more, got {args.top_k}")
    device_type = device_mod.select_device(args.device)
    dtype = device_mod.resolve_dtype(device_type, args.dtype)
    model, _ = checkpoint.load_model(args.checkpoint, device_type)
    enc = shards.get_tokenizer()
    print(f"sampling {args.checkpoint} on {device_type} ({dtype}), seed {args.seed}", file=sys.stderr)
    texts = sample_texts(model, enc, args.prompt, args.num_samples, args.max_new_tokens, torch.device(device_type),
                         dtype, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---")
        print(args.prompt + text)


def main(argv=None):
    with cli.log_to(sys.stderr):  # stdout is the result
        return cli.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
