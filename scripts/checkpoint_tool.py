#!/usr/bin/env python3
"""List, compare, prune, inspect, verify and export training checkpoints.

    python -m scripts.checkpoint_tool list log/ other_run/model_00500.pt   # step, epoch, losses, size, optimizer, latest
    python -m scripts.checkpoint_tool compare log_a/ log_b/model_02000.pt  # losses and run-config differences, side by side
    python -m scripts.checkpoint_tool prune log/ --keep 3 [--dry_run]      # the newest 3 step checkpoints stay
    python -m scripts.checkpoint_tool inspect log/model_05000.pt     # versions, config, settings, losses, data position
    python -m scripts.checkpoint_tool verify log/                    # read every byte and tensor; exit 1 if any is bad
    python -m scripts.checkpoint_tool export log/model_19072.pt --out gpt2.safetensors --dtype bf16
    python -m scripts.checkpoint_tool export log/model_19072.pt --out gpt2_124M.bin   # llm.c's model file

Other trainers' files work too: nanoGPT's out/ckpt.pt, build-nanogpt's log/model_*.pt, llm.c's .bin
(converters.py); inspect and verify say what they are and what the conversion chose.
`python checkpoint.py ...` runs this too. Exit status: 0 ok, 1 a file is corrupt or invalid,
2 usage (bad arguments, a missing path, a missing package, a folder a trainer holds).
"""
import contextlib
import functools
import json
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # started as a path: say the command that works, exit 2
    from _as_module import exit_with_module_command  # scripts/ is sys.path[0] here; it imports nothing of ours
    exit_with_module_command(__file__)

import environment  # noqa: E402,F401  before torch: it sets variables torch reads when it loads
import torch  # noqa: E402

import cli  # noqa: E402
import config_file  # noqa: E402
import converters  # noqa: E402
import device  # noqa: E402
import files  # noqa: E402
import optimizers  # noqa: E402
from model import MODEL_PRESETS, TIED_WEIGHTS  # noqa: E402
from run_config import BY_NAME  # noqa: E402
from run_folder import checkpoint_like_files  # noqa: E402
from checkpoint import (BEST_NAME, FORMAT_VERSION, LATEST_NAME, CheckpointError,  # noqa: E402
                        import_safetensors, is_epoch_checkpoint, iter_tensors, list_checkpoints, read_checkpoint,
                        read_latest, run_config_of, save_file, stored_config, tensor_bytes, verify_file)

# What only this trainer's checkpoints hold: inspect leaves these lines out for other trainers' files.
OURS_ONLY = ("format version", "torch version", "world size", "dataloader", "history", "grad scaler")


def storage_key(t):
    """What tensors sharing memory (tied weights) have in common: the same storage, offset and shape."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)


def tensor_stats(obj):
    """(distinct tensors, their bytes) in a nested dict/list."""
    return len({storage_key(t) for t in iter_tensors(obj)}), tensor_bytes(obj)


def existing(path):
    path = Path(path)
    if not path.exists():
        raise cli.UsageError(f"{path} does not exist")
    return path


def what(ckpt):
    """'  (nanoGPT checkpoint)' after a row about another trainer's file; nothing for this trainer's."""
    return f"  ({ckpt['foreign']})" if ckpt.get("foreign") else ""


def losses(ckpt):
    """What list and compare show of a checkpoint: its step, its epoch (the passes over the data the loader had
    completed), and the (step, loss) of the last train loss and of the last validation loss recorded before the
    save. The val loss may be older than the step (evaluations are every --eval_interval steps), so its step
    goes with it. Exports and other trainers' files keep no history: their val loss has no step (None)."""
    state = ckpt.get("train_state") or {}
    history = state.get("history") or {}
    train = tuple((history.get("train") or [(None, None)])[-1])
    val = tuple((history.get("val") or [(None, None)])[-1])
    if val[1] is None and state.get("val_loss") is not None:
        val = (None, state["val_loss"])
    return {"step": state.get("step"), "epoch": (ckpt.get("dataloader") or {}).get("epoch"), "train": train,
            "val": val, "best": state.get("best_val_loss")}


def at_step(entry):
    """(step, loss) as "2.7500 @ 250"; "3.0625" when the step is unknown; "-" without a loss."""
    step, loss = entry
    if loss is None:
        return "-"
    return f"{loss:.4f}" if step is None else f"{loss:.4f} @ {step}"


def dash(value):
    return "-" if value is None else str(value)


def cmd_list(args):
    paths = [existing(p) for p in args.paths]
    found = [p for path in paths for p in (checkpoint_like_files(path) if path.is_dir() else [path])]  # in that order
    folders = [p for p in paths if p.is_dir()]
    for folder in folders:
        if not checkpoint_like_files(folder):
            print(f"no checkpoints in {folder}")
    if not found:
        return 0
    one_folder = len(paths) == 1 and paths[0].is_dir()  # names alone; otherwise the paths as given
    shown = [p.name if one_folder else str(p) for p in found]
    width, status = max(len("file"), *map(len, shown)), 0
    latest_of = functools.cache(read_latest)  # one read per folder
    print(f"{'file':<{width}} {'step':>7} {'epoch':>5} {'train loss':>16} {'val loss':>16} {'size':>10}  optimizer")
    for path, name in zip(found, shown):
        try:
            ckpt = read_checkpoint(path)
            seen = losses(ckpt)
            row = (f"{dash(seen['step']):>7} {dash(seen['epoch']):>5} {at_step(seen['train']):>16} "
                   f"{at_step(seen['val']):>16} {path.stat().st_size / 1e6:>7.1f} MB  "
                   f"{'yes' if ckpt.get('optimizer') is not None else 'no'}{what(ckpt)}")
        except CheckpointError as exc:
            row, status = f"unreadable: {exc}", 1
        print(f"{name:<{width}} {row}{'  <- latest' if path.resolve() == latest_of(path.parent.resolve()) else ''}")
    for folder in folders:
        latest = read_latest(folder)
        if latest is not None:
            where = "" if one_folder else f" in {folder}"
            print(f"latest{where} -> {latest.name}" + ("" if latest.is_file() else " (missing!)"))
            status = status if latest.is_file() else 1
    return status


def newest_in(folder):
    """The checkpoint a folder's run is at: the one latest names, else the highest step."""
    latest = read_latest(folder)
    if latest is not None and latest.is_file():
        return latest
    steps = list_checkpoints(folder)
    if not steps:
        raise cli.UsageError(f"{folder} holds no model_*.pt checkpoint to compare; name a file instead")
    return steps[-1][1]


def flat(config, prefix=""):
    """A nested config dict as {"a.b": value}, for a row per setting."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def setting(value):
    return json.dumps(value) if isinstance(value, (list, tuple, dict, bool)) or value is None else str(value)


def cmd_compare(args):
    if len(args.paths) < 2:
        raise cli.UsageError("compare needs two checkpoints or more (a folder stands for its latest checkpoint)")
    paths = [newest_in(p) if p.is_dir() else p for p in map(existing, args.paths)]
    ckpts = [read_checkpoint(p) for p in paths]
    rows = [("file", [str(p) for p in paths]),
            ("kind", [c.get("foreign") or c.get("kind", "checkpoint") for c in ckpts])]
    for name, key, shown in (("step", "step", dash), ("epoch", "epoch", dash), ("train loss", "train", at_step),
                             ("val loss", "val", at_step),
                             ("best val loss", "best", lambda v: "-" if v is None else f"{v:.4f}")):
        rows.append((name, [shown(losses(c)[key]) for c in ckpts]))
    # The run's settings (RunConfig, or another trainer's under its names) and the model's shape; where each
    # value came from ("sources") is not a difference between the runs.
    configs = [{**{k: v for k, v in flat(run_config_of(c)).items()
                   if not k.startswith(("sources.", "model_config."))},
                **flat({"model": stored_config(c, p) if "model_config" in c else {}})} for c, p in zip(ckpts, paths)]
    keys = sorted(set().union(*configs))
    differ = [k for k in keys if len({setting(c.get(k, "-")) for c in configs}) > 1]
    none = [str(p) for p, c in zip(paths, ckpts) if not run_config_of(c)]
    rows.append((f"{len(differ)} of {len(keys)} settings differ"
                 + (f" ({', '.join(none)}: no run config)" if none else ""), [""] * len(paths)))
    rows += [(key, [setting(c[key]) if key in c else "-" for c in configs]) for key in differ]
    label = max(len(name) for name, values in rows if any(values))
    widths = [max(len(values[i]) for _, values in rows) for i in range(len(paths))]
    for name, values in rows:
        if not any(values):  # a heading
            print(name)
            continue
        print(f"{name:<{label}}  " + "  ".join(f"{v:<{w}}" for v, w in zip(values, widths)).rstrip())
    return 0


def trainer_holding(folder):
    """Who holds the run folder's lock ("pid 123 on host"), or None when no trainer does."""
    try:
        files.RunLock.check(folder)
        return None
    except files.RunLockError:
        try:
            holder = json.loads((folder / files.LOCK_NAME).read_text())
        except (OSError, ValueError):
            holder = {}
        return f"pid {holder['pid']} on {holder.get('host')}" if isinstance(holder, dict) and "pid" in holder \
            else "another process"


def cmd_prune(args):
    """The newest --keep step checkpoints stay; best_model.pt, epoch checkpoints and the file latest names are
    never removed. Under the folder's lock, so a trainer cannot start (and resume from a file) meanwhile."""
    folder = existing(args.dir)
    if not folder.is_dir():
        raise cli.UsageError(f"{folder} is not a directory")
    holder = trainer_holding(folder)
    if holder and args.dry_run:
        print(f"{folder} is in use by a trainer ({holder}): without --dry_run prune refuses until it stops")
    elif holder:
        raise busy(folder, holder)
    try:
        with contextlib.nullcontext() if args.dry_run else files.RunLock(folder, holder="checkpoint prune"):
            return prune(folder, args.keep, args.dry_run)
    except files.RunLockError:  # a trainer started between the look and the lock
        raise busy(folder, trainer_holding(folder) or "another process") from None


def busy(folder, holder):
    return cli.UsageError(f"{folder} is in use by a trainer ({holder}): pruning it now could remove the file it "
                          "resumes from or is about to keep. Prune after it stops, or let it prune itself with "
                          "--keep_last_n_checkpoints (--dry_run shows what would go)")


def prune(folder, keep, dry_run):
    steps = [p for _, p in list_checkpoints(folder) if not is_epoch_checkpoint(p)]
    latest = read_latest(folder)
    older = steps[:-keep]
    protected = [p for p in older if p.resolve() == latest]
    doomed = [p for p in older if p not in protected]
    freed = 0
    for path in doomed:
        size = path.stat().st_size
        if not dry_run:
            try:
                path.unlink()
            except OSError as exc:
                raise CheckpointError(f"could not remove {path}: {exc.strerror}") from None
        freed += size
        print(f"{'would remove' if dry_run else 'removed'} {path} ({size / 1e6:.1f} MB)")
    if doomed and not dry_run:
        files.fsync_dir(folder)
    for path in protected:
        print(f"kept {path.name}, older than the newest {keep}: latest_checkpoint.pt names it")
    epochs = sum(is_epoch_checkpoint(p) for _, p in list_checkpoints(folder))
    best = ", best_model.pt" if (folder / BEST_NAME).is_file() else ""
    print(f"{'would free' if dry_run else 'freed'} {freed / 1e6:.1f} MB; {'would keep' if dry_run else 'kept'} "
          f"{len(steps) - len(doomed)} step checkpoint(s){best}" + (f", {epochs} epoch checkpoint(s)" if epochs else ""))
    return 0


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
    found = checkpoint_like_files(path) if path.is_dir() else [path]
    if not found:
        print(f"BAD  {path}: no checkpoints to verify")
        return 1
    status = 0
    for file in found:
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


def run_settings(ckpt):
    """The options of a checkpoint's run that make the run (not how this command was called, nor what was derived),
    the model shape spelt out where it came from a file (--init_from)."""
    stored = run_config_of(ckpt)
    settings = {name: stored[name] for name, field in BY_NAME.items()
                if name in stored and field.metadata["kind"] != "invocation"}
    if settings.get("model") not in MODEL_PRESETS:  # --init_from FILE's shape: the numbers themselves
        shape = stored_config(ckpt, "checkpoint")
        settings.pop("model", None)
        settings.update({key: shape[key] for key in ("n_layer", "n_head", "n_embd", "block_size")})
    return settings


def cmd_config(args):
    path = existing(args.path)
    ckpt = read_checkpoint(path)
    if not run_config_of(ckpt):
        raise CheckpointError(f"{path} holds no run settings ({ckpt.get('foreign') or 'an export'})")
    comment = (f"# the settings of {path}'s run (step {ckpt['train_state'].get('step')}): "
               "python train_gpt2.py --config FILE --log_dir NEW_DIR\n")
    print(("" if args.format == "json" else comment) + config_file.dump(run_settings(ckpt), args.format), end="")
    return 0


def cast_weights(model_state, dtype):
    """The weights, floating-point ones cast to dtype; a shared tensor is cast once, so tied weights stay one."""
    cast = {}
    for t in model_state.values():
        if storage_key(t) not in cast:
            cast[storage_key(t)] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return {name: cast[storage_key(t)] for name, t in model_state.items()}


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
    weights = cast_weights(ckpt["model"], device.DTYPES[args.dtype])
    meta = {"format_version": FORMAT_VERSION, "kind": "export", "torch_version": str(torch.__version__),
            "train_state": {"step": ckpt["train_state"].get("step"), "val_loss": losses(ckpt)["val"][1]},
            "model_config": stored_config(ckpt, source), "dtype": args.dtype, "source": source.name}
    if out.suffix == ".pt":
        save_file({**meta, "model": weights}, out, hint="Free some space, or export elsewhere")
    else:  # safetensors refuses tensors that share memory: drop the tied copy, say so in the metadata
        tied = {k: v for k, v in TIED_WEIGHTS.items() if k in weights and v in weights}
        tensors = {k: v for k, v in weights.items() if k not in tied}
        text_meta = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in {**meta, "tied": tied}.items()}
        blob = safetensors_torch.save(tensors, metadata=text_meta)
        files.atomic_write(out, lambda f: f.write(blob), expected_bytes=len(blob), full_hint="Free some space, or export elsewhere")
    return exported(source, ckpt, args.dtype, out, "weights and model config")


def exported(source, ckpt, dtype, out, holding):
    print(f"exported {source} (step {ckpt['train_state'].get('step')}) as {dtype} to {out}: {holding} "
          f"({out.stat().st_size / 1e6:.1f} MB){what(ckpt)}")
    return 0


def parse_args(argv=None):
    p = cli.ArgumentParser(description="List, compare, prune, inspect, verify and export training checkpoints. "
                           "Exit status: 0 ok, 1 corrupt or invalid file, 2 usage error.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("list", help="checkpoints of log dirs and files: step, epoch, train loss, val loss (@ its "
                       "step), size, optimizer, latest")
    s.add_argument("paths", nargs="+", metavar="path", help="checkpoint files, or log dirs (every checkpoint in them)")
    s = sub.add_parser("compare", help="checkpoints side by side: steps, losses, the settings that differ")
    s.add_argument("paths", nargs="+", metavar="path", help="two checkpoint files or more; a log dir stands for its "
                   "latest checkpoint")
    s = sub.add_parser("prune", help="remove older step checkpoints: the newest --keep stay; best_model.pt, epoch "
                       "checkpoints and the one latest names are never removed")
    s.add_argument("dir")
    s.add_argument("--keep", type=cli.positive_int, required=True, help="step checkpoints to keep, the newest")
    s.add_argument("--dry_run", action="store_true", help="only list what would be removed")
    s = sub.add_parser("inspect", help="what one checkpoint holds: versions, step, config, settings, losses, data state")
    s.add_argument("path")
    s = sub.add_parser("verify", help="read every byte and tensor, check keys and shapes; exit 1 if any file is bad")
    s.add_argument("path", help="a checkpoint file, or a log dir (all model_*.pt, best_model.pt, latest)")
    s = sub.add_parser("config", help="a checkpoint's settings as a config file that reproduces its run "
                                      "(python checkpoint.py config CKPT > run.yaml; train_gpt2.py --config run.yaml)")
    s.add_argument("path")
    s.add_argument("--format", default="yaml", choices=["yaml", "toml", "json"], help="the file's format")
    s = sub.add_parser("export", help="weights and model config only, for inference or sharing")
    s.add_argument("path")
    s.add_argument("--out", required=True, help="output file: .pt, .safetensors, or .bin for llm.c's model format")
    s.add_argument("--dtype", default="fp32", choices=sorted(device.DTYPES), help="cast floating-point weights to this")
    return p.parse_args(argv)


def run(argv=None):
    args = parse_args(argv)
    return {"list": cmd_list, "compare": cmd_compare, "prune": cmd_prune, "inspect": cmd_inspect, "verify": cmd_verify,
            "config": cmd_config, "export": cmd_export}[args.command](args)


def main(argv=None):
    return cli.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
