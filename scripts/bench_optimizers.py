"""Does --optimizer muon pay? AdamW at the run's --max_lr against Muon at a few --muon_lr values, each a full
train_gpt2.py run on the same tokens and batch, then the table: validation loss against tokens and against
training time, the tokens (and seconds) each run needs to reach the AdamW run's final validation loss, and the
cost of a step and of its optimizer phase.

    python -m scripts.bench_optimizers --out bench/cpu --muon_lrs 0.005 0.01 0.02 -- \\
        --data_root data/docs --model d4 --seq_len 128 --total_batch_size 4096 --max_steps 400 --device cpu
    python -m scripts.bench_optimizers --out bench/cpu --report     # the table of every finished run in bench/cpu

Everything after `--` goes to every run as it is (the trainer's flags). Each run writes its own --log_dir under
--out (adamw, muon_lr0.02, ...); a finished run is not run again when the command is the same (one line says
so), an interrupted one continues (--auto_resume), so a long comparison can be run in parts, and --runs picks
some of them. Training time is the sum of the steps' times (metrics.jsonl's dt_ms): evaluation, checkpoints,
start-up and compilation are left out, the same for every run. The optimizer phase (optim_ms) is gradient
clipping plus the optimizer step. A val loss between two evaluations is read off the straight line between them.
"""
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # started as a path: say the command that works, exit 2
    from _as_module import exit_with_module_command  # scripts/ is sys.path[0] here; it imports nothing of ours
    exit_with_module_command(__file__)

import environment  # noqa: E402,F401  before torch: it sets variables torch reads when it loads

import cli  # noqa: E402
from checkpoint import load_checkpoint, read_latest, run_config_of  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DONE = "bench_done.json"  # in a run's folder: the command that finished there


def run_name(optimizer, lr):
    return optimizer if lr is None else f"{optimizer}_lr{lr:g}"


def planned_runs(args):
    """[(name, the optimizer flags)] in the order they run: AdamW first, its final loss is every run's target."""
    runs = [(run_name("adamw", None), ["--optimizer", "adamw"])]
    runs += [(run_name("adamw", lr), ["--optimizer", "adamw", "--max_lr", f"{lr:g}"]) for lr in args.adamw_lrs]
    runs += [(run_name("muon", lr), ["--optimizer", "muon", "--muon_lr", f"{lr:g}"]) for lr in args.muon_lrs]
    return [(name, flags) for name, flags in runs if not args.runs or name in args.runs]


def run_one(name, flags, train_args, out):
    """Train one run in its own process (as users run it), unless it finished with this command before."""
    log_dir = out / name
    command = [sys.executable, str(REPO_ROOT / "train_gpt2.py"), *train_args, *flags, "--log_dir", str(log_dir)]
    done = log_dir / DONE
    if done.is_file():
        if json.loads(done.read_text())["command"][2:] == command[2:]:
            print(f"{name}: finished before with this command; reusing its metrics ({done})")
            return
        raise cli.UserError(f"{log_dir} holds a finished run of another command ({done}); use another --out, or "
                            "delete that folder to run it again")
    resume = ["--auto_resume"]  # an interrupted run continues; a new folder starts fresh
    print(f"{name}: {shlex.join(command + resume)}", flush=True)
    with open(out / f"{name}.log", "a") as log:
        status = subprocess.run(command + resume, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT).returncode
    if status != 0:
        raise cli.UserError(f"{name} stopped with exit status {status}; its output is in {out / f'{name}.log'}")
    done.write_text(json.dumps({"command": command}))


# -----------------------------------------------------------------------------
# Reading the runs back


def read_run(log_dir):
    """What the table needs from a run folder: its metrics (the later line winning for a step a resume logged
    again) and its last checkpoint's settings and data."""
    steps, vals = {}, {}
    for line in (log_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            steps[record["step"]] = record
        elif "val_loss" in record:
            vals[record["step"]] = record["val_loss"]
    ckpt = load_checkpoint(read_latest(log_dir))
    config = run_config_of(ckpt)
    seconds, elapsed = {}, 0.0
    for step in sorted(steps):
        elapsed += steps[step]["dt_ms"] / 1000
        seconds[step] = elapsed
    tokens_per_step = config["total_batch_size"]
    curve = [((step + 1) * tokens_per_step, seconds[step], vals[step]) for step in sorted(vals) if step in seconds]
    late = sorted(steps)[len(steps) // 10:]  # the first tenth warms caches and allocators
    optim = [steps[s]["optim_ms"] for s in late if "optim_ms" in steps[s]]
    return {"config": config, "curve": curve, "seconds": elapsed,
            "train_tokens": sum((ckpt.get("dataloader") or {}).get("shard_tokens") or [0]),
            "step_ms": statistics.median(steps[s]["dt_ms"] for s in late),
            "optim_ms": statistics.median(optim) if optim else None,
            "final_train": statistics.mean(steps[s]["loss"] for s in sorted(steps)[-max(1, len(steps) // 20):])}


def reach(curve, target):
    """(tokens, seconds) at which the val loss curve first comes down to target, on the straight line between
    the two evaluations around it; None if it never does."""
    previous = None
    for point in curve:
        if point[2] <= target:
            if previous is None or previous[2] == point[2]:
                return point[0], point[1]
            share = (previous[2] - target) / (previous[2] - point[2])
            return (previous[0] + share * (point[0] - previous[0]), previous[1] + share * (point[1] - previous[1]))
        previous = point
    return None


def lr_of(run):
    config = run["config"]
    if config.get("optimizer") == "muon":
        return f"{config['muon_lr']:g} (AdamW {config['max_lr']:g})"
    return f"{config['max_lr']:g}"


def finished_runs(out):
    """The names of the finished runs in out: adamw first, then by optimizer and LR."""
    def order(name):
        optimizer, _, lr = name.partition("_lr")
        return name != "adamw", optimizer, float(lr or 0)

    return sorted((p.parent.name for p in out.glob(f"*/{DONE}")), key=order)


def report(out, asked=True):
    """The tables of the finished runs in out. Without a finished adamw run (whose final val loss is the target)
    there is none: an error where the table was asked for (--report), one line where runs were."""
    runs = {name: read_run(out / name) for name in finished_runs(out)}
    if "adamw" not in runs:
        if asked:
            raise cli.UserError(f"no finished adamw run in {out}: its final val loss is the target; run it first")
        print(f"no table yet: it needs the finished adamw run; then: python -m scripts.bench_optimizers --out {out} "
              "--report")
        return
    target = runs["adamw"]["curve"][-1][2]
    first = runs["adamw"]["config"]
    read = first["total_batch_size"] * first["max_steps"]
    print(f"\n{first.get('model')} on {first['data_root']}: {runs['adamw']['train_tokens']:,} train tokens; each run "
          f"reads {read:,} tokens ({first['max_steps']} steps of {first['total_batch_size']:,}), "
          f"{read / max(1, runs['adamw']['train_tokens']):.2f} epochs")
    print("\n| run | peak LR | final val | best val | train (last 5%) | tokens to AdamW's final val | "
          "seconds to it | step ms | optimizer ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        got = reach(run["curve"], target)
        cells = [name, lr_of(run), f"{run['curve'][-1][2]:.4f}", f"{min(p[2] for p in run['curve']):.4f}",
                 f"{run['final_train']:.4f}",
                 f"{got[0]:,.0f} ({got[0] / run['curve'][-1][0]:.0%})" if got else "not reached",
                 f"{got[1]:.1f}" if got else "-", f"{run['step_ms']:.1f}",
                 f"{run['optim_ms']:.2f}" if run["optim_ms"] is not None else "-"]
        print("| " + " | ".join(cells) + " |")
    print("\nval loss at each evaluation (training seconds so far in brackets)\n")
    print("| tokens | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    points = sorted({p[0] for run in runs.values() for p in run["curve"]})
    for tokens in points:
        cells = []
        for run in runs.values():
            point = next((p for p in run["curve"] if p[0] == tokens), None)
            cells.append(f"{point[2]:.4f} ({point[1]:.0f} s)" if point else "-")
        print(f"| {tokens:,} | " + " | ".join(cells) + " |")


def run(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                           epilog="after --: the trainer's flags, given to every run")
    p.add_argument("--out", required=True, metavar="DIR", help="a folder per run, and their output")
    p.add_argument("--muon_lrs", nargs="*", type=float, default=[0.005, 0.01, 0.02],
                   help="--muon_lr of each Muon run (default: 0.005 0.01 0.02, around the trainer's 0.01)")
    p.add_argument("--adamw_lrs", nargs="*", type=float, default=[],
                   help="more AdamW runs at these --max_lr (default: none; the adamw run takes the trainer's)")
    p.add_argument("--runs", nargs="*", default=None, metavar="NAME",
                   help="only these runs (adamw, muon_lr0.02, ...; default: all)")
    p.add_argument("--report", action="store_true", help="print the table of the finished runs, run nothing")
    args = p.parse_args(own)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        if any(flag in train_args for flag in ("--log_dir", "--optimizer", "--muon_lr", "--log-dir")):
            raise cli.UserError("the bench sets --log_dir, --optimizer and --muon_lr of each run; drop them after --")
        for name, flags in planned_runs(args):
            run_one(name, flags, train_args, out)
    report(out, asked=args.report)
    return 0


def main(argv=None):
    return cli.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
