"""HellaSwag: zero-shot accuracy of a GPT-2 model on the 10,042 validation examples.

Public API:
    load_examples(data_file=None, cache_dir=None, limit=None) -> list of dicts   (downloads once, then cached)
    render_examples(examples) -> list of RenderedExample                       (tokenize once, reuse every eval)
    evaluate(model, examples, device, dtype="fp32", batch_examples=16, rank=0, world_size=1,
             block_size=None, model_config=None) -> {"acc", "acc_norm", "n"}   (global over DDP ranks)
    count_correct(...) -> {"correct", "correct_norm", "n"}                     (this rank's share only)
    score(...) -> (sum_losses, mean_losses), each (len(examples), 4)           (per-ending losses)
    TrainingEval(interval, data_file, limit, device, dtype, rank, world_size)
        .due(step, last_step) / .run(model) -> {"hellaswag_acc", "hellaswag_acc_norm", "hellaswag_n"}
    HellaSwagError

    python hellaswag.py --checkpoint log/model_19072.pt [--data_file F] [--limit N]   # one JSON line
    python train_gpt2.py --hellaswag_interval 250 [--hellaswag_file F] [--hellaswag_limit N]   # during training

Each example is a context and 4 endings. Every ending is scored by the model's loss on its tokens
given the context: `acc` picks the ending with the lowest summed loss, `acc_norm` the lowest loss per
token (the number GPT-2 papers and build-nanogpt report; 124M GPT-2 gets about 0.29 / 0.29).
"""
import json
import os
import sys
import time
import urllib.request
from collections import namedtuple
from pathlib import Path

import environment  # noqa: F401  before torch: it sets variables torch reads when it loads
import numpy as np
import torch
from torch.nn import functional as F

import checkpoint
import cli
import device as device_mod
import distributed
import files
import shards
from model import unwrap

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
VAL_SIZE = 10042
VAL_NAME = "hellaswag_val.jsonl"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "gpt2-train" / "hellaswag"

# One example, tokenized: rows are context + ending, and only the ending tokens are scored.
RenderedExample = namedtuple("RenderedExample", "context endings label")


class HellaSwagError(cli.UserError):
    """The data cannot be had or read; the message names the file or URL and the fix."""


# -----------------------------------------------------------------------------
# Data


def parse_examples(text, source):
    """Examples from JSON lines in the official schema; an error names the line and what is wrong."""
    examples = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HellaSwagError(f"{source}:{lineno}: not JSON ({exc})") from None
        fields = example if isinstance(example, dict) else {}  # a JSON list or number fails every check
        endings, label = fields.get("endings"), fields.get("label")
        if not (isinstance(fields.get("ctx"), str) and isinstance(endings, list) and len(endings) == 4
                and all(isinstance(e, str) for e in endings) and isinstance(label, int) and 0 <= label < 4):
            raise HellaSwagError(f"{source}:{lineno}: not a HellaSwag example (needs \"ctx\": str, "
                                 f"\"endings\": 4 strings, \"label\": 0-3); is this the official hellaswag_val.jsonl?")
        examples.append(example)
    if not examples:
        raise HellaSwagError(f"{source} holds no examples")
    return examples


def download(path):
    """Fetch the validation file to path atomically: a half-written file never takes its name."""
    try:
        with urllib.request.urlopen(VAL_URL, timeout=60) as response:
            text = response.read().decode("utf-8")
    except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts and refused connections are OSErrors
        raise HellaSwagError(
            f"could not download HellaSwag from {VAL_URL}: {exc}. Fix: download that file elsewhere and pass "
            f"--data_file PATH, or put it at {path}") from None
    parse_examples(text, VAL_URL)  # a truncated or wrong response is an error here, not a bad cache later
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(path, lambda f: f.write(text.encode("utf-8")))  # temp file per process: DDP ranks may download at once


def load_examples(data_file=None, cache_dir=None, limit=None):
    """The validation examples from data_file, else from the cache, downloading them on first use."""
    if data_file is not None:
        path = Path(data_file)
    else:
        path = Path(cache_dir or os.environ.get("HELLASWAG_CACHE_DIR") or DEFAULT_CACHE_DIR) / VAL_NAME
        if not path.is_file():
            cli.log(f"hellaswag: downloading {VAL_URL} to {path}")
            download(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HellaSwagError(f"cannot read HellaSwag data {path} ({exc}); pass --data_file with a copy of "
                             f"{VAL_URL}") from None
    return parse_examples(text, path)[:limit]  # limit None: all


def render_examples(examples):
    """Tokenize raw examples; already rendered ones pass through. Do it once, outside the eval loop.
    As build-nanogpt's render_example, ending tokens are encoded with their leading space, as they follow
    the context in running text."""
    enc = None
    rendered = []
    for example in examples:
        if not isinstance(example, RenderedExample):
            enc = enc or shards.get_tokenizer()
            endings = [enc.encode_ordinary(" " + ending) for ending in example["endings"]]
            example = RenderedExample(enc.encode_ordinary(example["ctx"]), endings, int(example["label"]))
        rendered.append(example)
    return rendered


# -----------------------------------------------------------------------------
# Scoring


def resolve_block_size(model, block_size=None, model_config=None):
    """The longest input the model takes: explicit, else from its config, else from the model
    under any torch.compile / DDP wrapper; None means no limit."""
    if block_size is not None:
        return block_size
    if model_config is not None:
        return model_config["block_size"] if isinstance(model_config, dict) else model_config.block_size
    config = getattr(unwrap(model), "config", None)
    return getattr(config, "block_size", None)


def make_batch(rendered, block_size, pad_multiple, min_rows):
    """Inputs, targets and the mask of scored (ending) positions for 4 rows per example.

    Row = context + ending; the model reads row[:-1] and predicts row[1:]. Rows are right-padded
    to one length (rounded up to pad_multiple so a compiled model sees few shapes), and padded
    positions are never scored: causal attention means padding after a token cannot change its
    logits. A row longer than block_size + 1 loses tokens from the left of its context."""
    rows, ending_lens = [], []
    for example in rendered:
        for ending in example.endings:
            row = example.context + ending
            if block_size is not None:
                row = row[-(block_size + 1):]
            rows.append(row)
            ending_lens.append(min(len(ending), len(row) - 1))
    length = max(len(row) - 1 for row in rows)
    if pad_multiple > 1:
        length = -(-length // pad_multiple) * pad_multiple
        if block_size is not None:
            length = min(length, block_size)
    n_rows = max(len(rows), min_rows)  # extra all-padding rows keep the batch shape fixed
    inputs, targets = np.zeros((2, n_rows, length), dtype=np.int64)
    mask = np.zeros((n_rows, length), dtype=bool)
    for r, (row, n_ending) in enumerate(zip(rows, ending_lens)):
        n = len(row) - 1
        inputs[r, :n] = row[:-1]
        targets[r, :n] = row[1:]
        mask[r, n - n_ending:n] = True
    return torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(mask)


@torch.no_grad()
def score(model, examples, device, dtype="fp32", batch_examples=16, block_size=None, model_config=None,
          pad_multiple=8, progress=None, min_batches=0):
    """Loss of each ending given its context: (sum_losses, mean_losses), float32 tensors of shape
    (len(examples), 4) on the CPU, in the order given. Examples are batched longest first so rows
    of a batch have similar lengths (little padding); the result does not depend on the order.
    min_batches: run at least this many forward passes (an FSDP model's ranks must run as many as
    each other, and their shares of the examples can differ by a batch)."""
    rendered = render_examples(examples)
    block_size = resolve_block_size(model, block_size, model_config)
    device = torch.device(device)
    sum_losses, mean_losses = torch.zeros(2, len(rendered), 4)
    order = sorted(range(len(rendered)), key=lambda i: -max(len(rendered[i].context) + len(e)
                                                            for e in rendered[i].endings))
    # Several batches: pad the last to the full row count, so every batch has the same shape.
    min_rows = 4 * batch_examples if len(order) > batch_examples else 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_examples):
            chosen = order[start:start + batch_examples]
            inputs, targets, mask = make_batch([rendered[i] for i in chosen], block_size, pad_multiple, min_rows)
            inputs, targets, mask = (t.to(device, non_blocking=True) for t in (inputs, targets, mask))
            with device_mod.autocast(device.type, dtype):
                logits, _ = model(inputs)
            # Only ending positions, in fp32: a bf16 log-softmax over 50k tokens is too coarse to rank endings.
            token_losses = F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")
            row_of_token = torch.arange(mask.size(0), device=device).unsqueeze(1).expand_as(mask)[mask]
            row_sums = torch.zeros(mask.size(0), device=device).index_add_(0, row_of_token, token_losses)
            row_means = row_sums / mask.sum(1).clamp(min=1)
            n = len(chosen)
            index = torch.tensor(chosen)
            sum_losses[index] = row_sums[:4 * n].view(n, 4).cpu()
            mean_losses[index] = row_means[:4 * n].view(n, 4).cpu()
            if progress is not None:
                progress(min(start + batch_examples, len(order)), len(order))
        for _ in range(-(-len(order) // batch_examples), min_batches):
            with device_mod.autocast(device.type, dtype):
                model(torch.zeros((4, pad_multiple), dtype=torch.long, device=device))  # its result is not used
    finally:
        model.train(was_training)
    return sum_losses, mean_losses


def count_correct(model, examples, device, dtype="fp32", batch_examples=16, rank=0, world_size=1, **options):
    """This rank's share (examples i with i % world_size == rank): {"correct", "correct_norm", "n"}.
    options: score's (block_size, model_config, pad_multiple, progress, min_batches)."""
    shard = render_examples(examples[rank::world_size])
    sum_losses, mean_losses = score(model, shard, device, dtype, batch_examples, **options)
    labels = torch.tensor([example.label for example in shard])
    return {"correct": int((sum_losses.argmin(1) == labels).sum()),
            "correct_norm": int((mean_losses.argmin(1) == labels).sum()), "n": len(shard)}


def evaluate(model, examples, device, dtype="fp32", batch_examples=16, rank=0, world_size=1, **options):
    """HellaSwag accuracy over all ranks: {"acc", "acc_norm", "n"}, the same on every rank.

    Call it on every rank with the same examples (ideally pre-rendered with render_examples);
    each scores its share and the counts are summed when torch.distributed is initialised.
    model may be compiled; pass the raw model's config (or block_size) to truncate long rows."""
    counts = count_correct(model, examples, device, dtype, batch_examples, rank, world_size, **options)
    if world_size > 1:
        totals = distributed.sum_over_ranks(torch.tensor(list(counts.values()), dtype=torch.long, device=device))
        counts = dict(zip(counts, totals.tolist()))
    if counts["n"] == 0:
        raise HellaSwagError("no HellaSwag examples to evaluate (empty data file or --limit 0)")
    return {"acc": counts["correct"] / counts["n"], "acc_norm": counts["correct_norm"] / counts["n"], "n": counts["n"]}


# -----------------------------------------------------------------------------
# During training


class TrainingEval:
    """HellaSwag during training, one call from the loop:

        if hellaswag_eval.due(step, last_step):
            metrics.log(step, **hellaswag_eval.run(model))

    The examples are read (downloaded on first use) and tokenized once, at start, so a missing file
    fails before training does. Every rank calls run() with the training model, compiled and/or
    DDP-wrapped: each scores its share and the counts are all-reduced, so every rank returns the
    result over all examples."""

    def __init__(self, interval, data_file=None, limit=None, device="cpu", dtype="fp32", rank=0, world_size=1,
                 batch_examples=16, sharded=False):
        self.interval = interval
        self.device, self.dtype, self.rank, self.world_size = device, dtype, rank, world_size
        self.sharded = sharded  # FSDP: every rank must run as many forward passes as the others
        self.batch_examples = batch_examples
        self.examples = render_examples(load_examples(data_file, limit=limit)) if interval > 0 else []

    def due(self, step, last_step=False):
        """Every `interval` steps and at the last step; never when the interval is 0."""
        return self.interval > 0 and (step % self.interval == 0 or last_step)

    def run(self, model):
        """{"hellaswag_acc", "hellaswag_acc_norm", "hellaswag_n"} over all ranks' examples."""
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module  # the (possibly compiled) model inside: scoring needs no gradient hooks
        batches = -(-len(self.examples[self.rank::self.world_size]) // self.batch_examples)
        result = evaluate(model, self.examples, self.device, self.dtype, self.batch_examples, self.rank,
                          self.world_size,  # the block size comes from the model under its wrappers
                          min_batches=distributed.agree(batches, "max") if self.sharded else 0)
        return {f"hellaswag_{key}": value for key, value in result.items()}


# -----------------------------------------------------------------------------
# Command line


def run(argv=None):
    p = cli.ArgumentParser(description="HellaSwag validation accuracy of a checkpoint; prints one JSON line.")
    p.add_argument("--checkpoint", required=True, help=checkpoint.ANY_FILE)
    p.add_argument("--data_file", default=None,
                   help=f"local hellaswag_val.jsonl (default: download {VAL_URL} once into $HELLASWAG_CACHE_DIR "
                        f"or {DEFAULT_CACHE_DIR})")
    device_mod.add_device_arguments(p)  # the ending losses are summed in fp32 whatever --dtype
    p.add_argument("--limit", type=cli.positive_int, default=None, help=f"score only the first N examples (default: all {VAL_SIZE})")
    p.add_argument("--batch_examples", type=cli.positive_int, default=16, help="examples per forward pass (4 rows each)")
    args = p.parse_args(argv)
    device_type = device_mod.select_device(args.device)
    dtype = device_mod.resolve_dtype(device_type, args.dtype)
    model, config = checkpoint.load_model(args.checkpoint, device_type)  # a wrong path fails before any download
    examples = load_examples(args.data_file, limit=args.limit)
    cli.log(f"hellaswag: {len(examples)} examples, {args.checkpoint} on {device_type} ({dtype})")
    rendered = render_examples(examples)
    reported = [0]

    def progress(done, total):
        if done * 10 // total > reported[0] or done == total:
            reported[0] = done * 10 // total
            cli.log(f"hellaswag: {done}/{total} examples, {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    result = evaluate(model, rendered, device_type, dtype, args.batch_examples, model_config=config, progress=progress)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(result))


def main(argv=None):
    with cli.log_to(sys.stderr):  # stdout is the result
        return cli.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
