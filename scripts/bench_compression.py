#!/usr/bin/env python3
"""How much lossless compression shrinks a real checkpoint, and what it costs to write and read. A table.

    python -m scripts.bench_compression                           # GPT-2 124M + AdamW: ~20 min, ~8 GB RAM on 2 cores
    python -m scripts.bench_compression --model d2 --steps 1     # seconds: the mechanics only

It trains --model for --steps AdamW steps on the CPU (tiny Shakespeare, or --data_root), so the optimizer's
moments hold real gradients, saves the checkpoint with the trainer's CheckpointManager, and then writes that
file's contents through each method below, in memory (no disk: a smaller file also writes faster on a slow
disk, size / disk speed, which the table leaves to the reader):

    torch.save          the trainer's file today: torch's zip, its entries stored uncompressed
    zip deflate-N       the same zip with its entries deflated at level N; torch.load reads it as it is
                        (but not memory-mapped)
    zstd-N              the whole file through zstd at level N (one thread; needs `pip install zstandard`)
    zstd-N byte planes  each entry's bytes regrouped into 4 planes (byte 0 of every fp32, then byte 1, ...)
                        before zstd, so the exponent bytes, which repeat, sit together

Every method is checked to give back every tensor bit for bit. Also: the sizes of what shrinks files without
compression (the weights without the optimizer, as --save_optimizer latest keeps older files, and a bf16 export),
and zstd-3 per part of the checkpoint. Figures: docs/PERFORMANCE.md (checkpoint compression).
"""
import contextlib
import io
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

if __name__ == "__main__" and not __package__:  # started as a path: say the command that works, exit 2
    from _as_module import exit_with_module_command  # scripts/ is sys.path[0] here; it imports nothing of ours
    exit_with_module_command(__file__)

import environment  # noqa: E402,F401  before torch: it sets variables torch reads when it loads
import numpy as np  # noqa: E402
import torch  # noqa: E402

import checkpoint  # noqa: E402
import checkpoint_manager  # noqa: E402
import cli  # noqa: E402
import dataloader  # noqa: E402
import dataprep  # noqa: E402
import run_config  # noqa: E402
import run_state  # noqa: E402
from model import GPT, GPTConfig, MODEL_PRESETS  # noqa: E402
from scripts.checkpoint_tool import cast_weights  # noqa: E402  the weights as `checkpoint_tool export` writes them
from train_gpt2 import StepSpec, train_step  # noqa: E402

PLANES = 4  # fp32: the model and AdamW's moments are all fp32 here


def import_zstandard():
    try:
        import zstandard
    except ImportError:
        raise cli.UsageError("the zstd rows need the zstandard package: pip install zstandard "
                             "(or --methods torch.save deflate-1 deflate-6)") from None
    return zstandard


# -----------------------------------------------------------------------------
# The methods: (write: state -> bytes, read: bytes -> state)


def torch_bytes(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def torch_state(blob):
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def deflated_zip(blob, level):
    """torch's zip with every entry deflated: the names and order torch wrote, compressed."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED,
                                                                     compresslevel=level) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return out.getvalue()


def to_planes(data, shape=(-1, PLANES)):
    """A permutation of the bytes: byte k of every 4-byte word, for k = 0..3, then the tail."""
    body = len(data) - len(data) % PLANES
    return np.frombuffer(data, dtype=np.uint8, count=body).reshape(shape).T.tobytes() + data[body:]


def from_planes(data):
    return to_planes(data, shape=(PLANES, -1))  # the planes as rows: their transpose is the words again


def zstd_planes(blob, level, zstandard):
    """Each zip entry in byte planes, then zstd; a small index of names and lengths in front."""
    compressor = zstandard.ZstdCompressor(level=level)
    with zipfile.ZipFile(io.BytesIO(blob)) as src:  # torch's zip names each entry once
        parts = {name: compressor.compress(to_planes(src.read(name))) for name in src.namelist()}
    index = "\n".join(f"{name}\t{len(part)}" for name, part in parts.items()).encode()
    return len(index).to_bytes(8, "little") + index + b"".join(parts.values())


def from_zstd_planes(blob, zstandard):
    decompressor = zstandard.ZstdDecompressor()
    size = int.from_bytes(blob[:8], "little")
    offset, out = 8 + size, io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for line in blob[8:8 + size].decode().split("\n"):
            name, length = line.split("\t")
            dst.writestr(name, from_planes(decompressor.decompress(blob[offset:offset + int(length)])))
            offset += int(length)
    return out.getvalue()


def methods(names):
    """{name: (write(state) -> bytes, read(bytes) -> state)} for the names asked for."""
    table = {"torch.save": (torch_bytes, torch_state)}
    for level in (1, 6):
        table[f"deflate-{level}"] = (lambda s, level=level: deflated_zip(torch_bytes(s), level), torch_state)
    if any(name.startswith("zstd") for name in names):
        zstandard = import_zstandard()
        for level in (1, 3, 9):
            table[f"zstd-{level}"] = (
                lambda s, level=level: zstandard.ZstdCompressor(level=level).compress(torch_bytes(s)),
                lambda b: torch_state(zstandard.ZstdDecompressor().decompress(b)))
            table[f"zstd-{level}-planes"] = (lambda s, level=level: zstd_planes(torch_bytes(s), level, zstandard),
                                             lambda b: torch_state(from_zstd_planes(b, zstandard)))
    unknown = [name for name in names if name not in table]
    if unknown:
        raise cli.UsageError(f"unknown --methods {', '.join(unknown)}; choose from {', '.join(table)}")
    return {name: table[name] for name in names}


DEFAULT_METHODS = ["torch.save", "deflate-1", "deflate-6", "zstd-1", "zstd-3", "zstd-9", "zstd-1-planes",
                   "zstd-3-planes"]


def same_tensors(a, b):
    """Every tensor of a equal, bit for bit, to b's; the plain values equal too."""
    if isinstance(a, torch.Tensor):
        bits = lambda t: t.reshape(-1).contiguous().view(torch.uint8) if t.is_floating_point() else t  # noqa: E731
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bool(bits(a).equal(bits(b)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_tensors, a, b))
    return a == b or (a != a and b != b)  # NaN == NaN here: a copy, not arithmetic


# -----------------------------------------------------------------------------
# The checkpoint measured


def trained_checkpoint(args, work):
    """The path of a checkpoint of --model after --steps AdamW steps, written by the trainer's manager."""
    if args.data_root == run_config.DEFAULT_DATA_ROOT:
        dataprep.ensure_tinyshakespeare(args.data_root)
    loader = dataloader.ShardedDataLoader(args.data_root, "train", args.micro_batch_size, args.seq_len)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL_PRESETS[args.model]))
    optimizer = model.configure_optimizer(0.1, 6e-4)
    spec = StepSpec(1, 1.0, torch.device("cpu"), "fp32")
    for step in range(args.steps):
        loss, _ = train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), loader,
                             6e-4 * (step + 1) / args.steps, spec)
        print(f"step {step}: loss {loss.item():.4f}", file=sys.stderr)
    train_state = run_state.TrainState()
    train_state.record(args.steps - 1, loss.item())
    parts = {"model": model, "optimizer": optimizer, "dataloader": loader, "rng": run_state.RandomState(),
             "train_state": train_state}
    manager = checkpoint_manager.CheckpointManager(work, parts, meta={"model_config": vars(model.config)},
                                                   checkpoint_interval=1)
    with contextlib.redirect_stdout(sys.stderr):  # its "saved ..." line is not the table
        manager.save(args.steps - 1)
        manager.close()
    return checkpoint.step_path(work, args.steps - 1), sum(p.numel() for p in model.parameters())


def timed(fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


def measure(args, work):
    path, n_params = trained_checkpoint(args, work)
    state = checkpoint.load_file(path)  # memory-mapped; the first write below reads it in
    torch_bytes(state)
    rows = []
    for name, (write, read) in methods(args.methods).items():
        write_s, read_s = [], []
        for _ in range(args.repeats):  # the fastest of the repeats: other processes only ever slow one down
            blob, seconds = timed(write, state)
            write_s.append(seconds)
            back, seconds = timed(read, blob)
            read_s.append(seconds)
            if not same_tensors(state, back):
                raise cli.UserError(f"{name} did not give back the checkpoint bit for bit")
            del back
        rows.append((name, len(blob), min(write_s), min(read_s)))
        del blob
    extra = [("weights only (--save_optimizer latest)", len(torch_bytes({**state, "optimizer": None}))),
             ("bf16 export (weights only)", len(torch_bytes(cast_weights(state["model"], torch.bfloat16))))]
    return rows, extra, parts_table(state, args), n_params


def parts_table(state, args):
    """zstd-3 of each part's tensor bytes, as they are and in byte planes: what compresses and what does not."""
    if not any(name.startswith("zstd") for name in args.methods):
        return []
    zstandard = import_zstandard()
    opt = state["optimizer"]["state"]
    groups = {"model weights": list(state["model"].values()),
              "AdamW exp_avg": [s["exp_avg"] for s in opt.values()],
              "AdamW exp_avg_sq": [s["exp_avg_sq"] for s in opt.values()]}
    rows = []
    for name, tensors in groups.items():
        distinct = {t.untyped_storage().data_ptr(): t for t in tensors}  # the tied embedding once
        data = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in distinct.values())
        compressor = zstandard.ZstdCompressor(level=3)
        rows.append((name, len(data), len(compressor.compress(data)), len(compressor.compress(to_planes(data)))))
    return rows


def report(args, rows, extra, parts, n_params):
    mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
    print(f"checkpoint compression: {args.model} ({n_params / 1e6:.1f}M parameters) + AdamW after {args.steps} "
          f"step(s) of {args.micro_batch_size} x {args.seq_len} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, in memory, fastest of {args.repeats}; every method checked bit for bit")
    print(f"  {'method':<16} {'size':>12} {'saved':>7} {'write':>9} {'read':>9}")
    for name, size, write_s, read_s in rows:
        print(f"  {name:<16} {mb(size):>12} {1 - size / rows[0][1]:>7.1%} {write_s:>8.2f}s {read_s:>8.2f}s")
    for name, size in extra:
        print(f"  {name}: {mb(size)} ({size / rows[0][1]:.1%} of the checkpoint)")
    for name, raw, packed, planes in parts:
        print(f"  zstd-3 of {name}: {mb(raw)} -> {mb(packed)} ({1 - packed / raw:.1%} saved), "
              f"byte planes {mb(planes)} ({1 - planes / raw:.1%} saved)")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", choices=sorted(MODEL_PRESETS), help="model preset")
    p.add_argument("--steps", type=cli.positive_int, default=3, help="AdamW steps before the save")
    p.add_argument("--micro_batch_size", type=cli.positive_int, default=4, help="sequences per step")
    p.add_argument("--seq_len", type=cli.positive_int, default=256, help="tokens per sequence")
    p.add_argument("--data_root", default=run_config.DEFAULT_DATA_ROOT,
                   help="token files to train on (tiny Shakespeare is prepared there when it is the default)")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="what to measure, the first the baseline")
    p.add_argument("--repeats", type=cli.positive_int, default=2, help="times each write and read; the fastest is shown")
    p.add_argument("--dir", default=None, help="where the checkpoint is written (default: a temp dir, deleted after)")
    return p.parse_args(argv)


def run(argv=None):
    args = parse_args(argv)
    methods(args.methods)  # an unknown name or a missing package: before minutes of training
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_compression_"))
    try:
        report(args, *measure(args, work))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    return cli.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
