#!/usr/bin/env python3
"""List, inspect, verify and export training checkpoints.

    python -m scripts.checkpoint_tool list log/                      # step, val loss, size, optimizer, latest
    python -m scripts.checkpoint_tool inspect log/model_05000.pt     # versions, config, settings, losses, data position
    python -m scripts.checkpoint_tool verify log/                    # read every byte and tensor; exit 1 if any is bad
    python -m scripts.checkpoint_tool export log/model_19072.pt --out gpt2.safetensors --dtype bf16
    python -m scripts.checkpoint_tool export log/model_19072.pt --out gpt2_124M.bin   # llm.c's model file

Other trainers' files work too: nanoGPT's out/ckpt.pt, build-nanogpt's log/model_*.pt, llm.c's .bin
(converters.py); inspect and verify say what they are and what the conversion chose.
`python checkpoint.py ...` runs this too. Exit status: 0 ok, 1 a file is corrupt or invalid,
2 usage (bad arguments, a missing path, a missing package).
"""
import json
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # started as a path: say the command that works, exit 2
    from _as_module import exit_with_module_command  # scripts/ is sys.path[0] here; it imports nothing of ours
    exit_with_module_command(__file__)

import environment  # noqa: E402,F401  before torch: it sets variables torch reads when it loads
import torch  # noqa: E402

import cli  # noqa: E402
import converters  # noqa: E402
import device  # noqa: E402
import files  # noqa: E402
import optimizers  # noqa: E402
from model import TIED_WEIGHTS  # noqa: E402
from checkpoint import (BEST_NAME, FORMAT_VERSION, LATEST_NAME, CheckpointError,  # noqa: E402
                        import_safetensors, iter_tensors, list_checkpoints, read_checkpoint, read_latest, run_config_of,
                        save_file, stored_config, tensor_bytes, verify_file)

NANOGPT_NAME = "ckpt.pt"  # nanoGPT's one checkpoint in its out_dir
# What only this trainer's checkpoints hold: inspect leaves these lines out for other trainers' files.
OURS_ONLY = ("format version", "torch version", "world size", "dataloader", "history", "grad scaler")


def tensor_stats(obj):
    """(distinct tensors, their bytes) in a nested dict/list."""
    seen = set()
    for t in iter_tensors(obj):
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)))
    return len(seen), tensor_bytes(obj)


def last_val(ckpt):
    state = ckpt.get("train_state") or {}
    if state.get("val_loss") is not None:
        return state["val_loss"]
    val = (state.get("history") or {}).get("val") or [[None, None]]
    return val[-1][1]


def existing(path):
    path = Path(path)
    if not path.exists():
        raise cli.UsageError(f"{path} does not exist")
    return path


def checkpoint_files(log_dir):
    """The checkpoint files in a folder: model_*.pt (this trainer's, or build-nanogpt's, which it names alike),
    best_model.pt, nanoGPT's ckpt.pt and llm.c's model files (*.bin)."""
    found = [p for _, p in list_checkpoints(log_dir)]
    found += [log_dir / name for name in (BEST_NAME, NANOGPT_NAME) if (log_dir / name).is_file()]
    return found + [p for p in sorted(log_dir.glob("*.bin")) if p.is_file() and converters.is_llmc_model(p)]


def what(ckpt):
    """'  (nanoGPT checkpoint)' after a row about another trainer's file; nothing for this trainer's."""
    return f"  ({ckpt['foreign']})" if ckpt.get("foreign") else ""


def cmd_list(args):
    log_dir = existing(args.dir)
    if not log_dir.is_dir():
        raise cli.UsageError(f"{log_dir} is not a directory")
    files = checkpoint_files(log_dir)
    if not files:
        print(f"no checkpoints in {log_dir}")
        return 0
    latest, status = read_latest(log_dir), 0
    print(f"{'file':<18} {'step':>7} {'val loss':>9} {'size':>10}  optimizer")
    for path in files:
        try:
            ckpt = read_checkpoint(path)
            val = last_val(ckpt)
            step = (ckpt.get("train_state") or {}).get("step")
            row = (f"{'-' if step is None else step:>7} {'-' if val is None else f'{val:.4f}':>9} "
                   f"{path.stat().st_size / 1e6:>7.1f} MB  {'yes' if ckpt.get('optimizer') is not None else 'no'}"
                   f"{what(ckpt)}")
        except CheckpointError as exc:
            row, status = f"unreadable: {exc}", 1
        print(f"{path.name:<18} {row}{'  <- latest' if path.resolve() == latest else ''}")
    if latest is not None:
        print(f"latest -> {latest.name}" + ("" if latest.is_file() else " (missing!)"))
        status = status if latest.is_file() else 1
    return status


def cmd_inspect(args):
    path = existing(args.path)
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint of this trainer")
    run_config = run_config_of(ckpt)
    summary = run_config if ckpt.get("foreign") else {  # another trainer's settings: all of them, under its names
        k: run_config[k] for k in ("model", "data_root", "max_steps", "total_batch_size", "micro_batch_size",
                                   "seq_len", "max_lr", "min_lr", "warmup_steps", "optimizer", "muon_lr", "dtype",
                                   "device", "seed")
        if k in run_config}
    state = ckpt.get("train_state") or {}
    step, history = state.get("step"), state.get("history") or {}
    model_count, model_bytes = tensor_stats(ckpt.get("model"))
    opt_count, opt_bytes = tensor_stats(ckpt.get("optimizer"))
    config = stored_config(ckpt, path) if "model_config" in ckpt else None
    lines = [
        ("file", f"{path} ({path.stat().st_size / 1e6:.1f} MB)"),
        ("kind", ckpt.get("foreign") or ckpt.get("kind", "checkpoint")),
        ("format version", ckpt.get("format_version")),
        ("torch version", ckpt.get("torch_version")),
        ("step", "-" if step is None else f"{step} (the last completed step: {step + 1} steps done)"),
        ("model_config", json.dumps(config)),
        ("run config", json.dumps(summary)),
        ("world size", ckpt.get("world_size")),
        ("val loss", state.get("val_loss")),
        ("best val loss", state.get("best_val_loss")),
        ("dataloader", json.dumps({k: v for k, v in (ckpt.get("dataloader") or {}).items()
                                   if k not in ("shards", "shard_tokens", "fingerprints")})),  # lists per shard
        ("history", f"{len(history.get('train', []))} train losses, {len(history.get('val', []))} val losses"),
        ("model tensors", f"{model_count} ({model_bytes / 1e6:.1f} MB)"),
        ("optimizer", f"{optimizers.NAMES.get(optimizers.kind_of_state(ckpt.get('optimizer')), 'unknown')}, "
                      f"{opt_count} tensors ({opt_bytes / 1e6:.1f} MB)" if ckpt.get("optimizer") is not None
         else "none" if ckpt.get("foreign") else "none (weights only)"),  # other trainers': the notes say why
        ("grad scaler", ckpt.get("scaler") or "none"),
    ] + [("note", note) for note in ckpt.get("notes", ())]
    for name, value in lines:
        if not (ckpt.get("foreign") and name in OURS_ONLY):
            print(f"{name:<15} {value}")
    return 0


def cmd_verify(args):
    path = existing(args.path)
    if path.is_dir():
        files = checkpoint_files(path)
        if not files:
            print(f"BAD  {path}: no checkpoints to verify")
            return 1
    else:
        files = [path]
    status = 0
    for file in files:
        try:
            ckpt = verify_file(file)
            count, nbytes = tensor_stats(ckpt)
            print(f"ok   {file}  step {ckpt['train_state'].get('step')}  {count} tensors, {nbytes / 1e6:.1f} MB read{what(ckpt)}")
        except CheckpointError as exc:
            print(f"BAD  {file}: {exc}")
            status = 1
    if path.is_dir() and ((path / LATEST_NAME).exists() or (path / LATEST_NAME).is_symlink()):
        latest = read_latest(path)
        if latest is None or not latest.is_file():
            print(f"BAD  {path / LATEST_NAME} points at {latest}, which does not exist")
            status = 1
    return status


def cmd_export(args):
    out = Path(args.out)
    if out.suffix not in (".pt", ".safetensors", ".bin"):
        raise cli.UsageError(f"--out {out} must end in .pt, .safetensors or .bin (llm.c's model file)")
    if out.suffix == ".bin" and args.dtype not in ("fp32", "bf16"):
        raise cli.UsageError(f"llm.c model files hold fp32 or bf16 weights, not {args.dtype}: --dtype fp32 or bf16")
    safetensors_torch = import_safetensors() if out.suffix == ".safetensors" else None
    source = existing(args.path)
    ckpt = verify_file(source)
    if out.suffix == ".bin":  # for llm.c's C/CUDA trainer; it computes the tanh GELU, so write_llmc refuses the exact
        converters.write_llmc(ckpt["model"], stored_config(ckpt, source), out, dtype=args.dtype)
        return exported(source, ckpt, args.dtype, out, "an llm.c model file")
    dtype, cast = device.DTYPES[args.dtype], {}
    weights = {}
    for name, t in ckpt["model"].items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in cast:  # cast a shared tensor once, so tied weights stay one tensor in a .pt
            cast[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
        weights[name] = cast[key]
    meta = {"format_version": FORMAT_VERSION, "kind": "export", "torch_version": str(torch.__version__),
            "train_state": {"step": ckpt["train_state"].get("step"), "val_loss": last_val(ckpt)},
            "model_config": stored_config(ckpt, source),
            "dtype": args.dtype, "source": source.name}
    if out.suffix == ".pt":
        save_file({**meta, "model": weights}, out, hint="Free some space, or export elsewhere")
    else:  # safetensors refuses tensors that share memory: drop the tied copy, say so in the metadata
        tied = {k: v for k, v in TIED_WEIGHTS.items() if k in weights and v in weights}
        tensors = {k: v for k, v in weights.items() if k not in tied}
        text_meta = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in meta.items()}
        text_meta["tied"] = json.dumps(tied)
        blob = safetensors_torch.save(tensors, metadata=text_meta)
        files.atomic_write(out, lambda f: f.write(blob), expected_bytes=len(blob), full_hint="Free some space, or export elsewhere")
    return exported(source, ckpt, args.dtype, out, "weights and model config")


def exported(source, ckpt, dtype, out, holding):
    print(f"exported {source} (step {ckpt['train_state'].get('step')}) as {dtype} to {out}: {holding} "
          f"({out.stat().st_size / 1e6:.1f} MB){what(ckpt)}")
    return 0


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Inspect, verify and export training checkpoints. "
                           "Exit status: 0 ok, 1 corrupt or invalid file, 2 usage error.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("list", help="every checkpoint in a log dir: step, val loss, size, optimizer, latest")
    s.add_argument("dir")
    s = sub.add_parser("inspect", help="what one checkpoint holds: versions, step, config, settings, losses, data state")
    s.add_argument("path")
    s = sub.add_parser("verify", help="read every byte and tensor, check keys and shapes; exit 1 if any file is bad")
    s.add_argument("path", help="a checkpoint file, or a log dir (all model_*.pt, best_model.pt, latest)")
    s = sub.add_parser("export", help="weights and model config only, for inference or sharing")
    s.add_argument("path")
    s.add_argument("--out", required=True, help="output file: .pt, .safetensors, or .bin for llm.c's model format")
    s.add_argument("--dtype", default="fp32", choices=sorted(device.DTYPES), help="cast floating-point weights to this")
    return p.parse_args(argv)


def run(argv=None):
    args = parse_args(argv)
    return {"list": cmd_list, "inspect": cmd_inspect, "verify": cmd_verify, "export": cmd_export}[args.command](args)


def main(argv=None):
    return cli.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
