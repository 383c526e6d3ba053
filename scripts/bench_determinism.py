#!/usr/bin/env python3
"""Are two runs, and a run and its resume, bit-identical? Runs train_gpt2.py three times per
configuration (A and B from step 0, C resumed from A's checkpoint at --resume_at) and prints a table:
how many step losses A and B share exactly, and C and A after the resume, with the largest difference.

    python -m scripts.bench_determinism --data_root data/tinyshakespeare                 # GPT-2 124M, 16 x 1024
    python -m scripts.bench_determinism --data_root DIR --compile none default --deterministic off on

Each run is its own process, as a user's runs are. Extra train_gpt2.py flags follow `--`.
"""
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__" and not __package__:  # started as a path: say the command that works, exit 2
    from _as_module import exit_with_module_command  # scripts/ is sys.path[0] here; it imports nothing of ours
    exit_with_module_command(__file__)

import cli  # noqa: E402

TRAINER = Path(__file__).resolve().parent.parent / "train_gpt2.py"


def losses(log_dir):
    records = [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}, [r["tok_per_sec"] for r in records if "loss" in r]


def run_trainer(argv):
    """train_gpt2.py in a process of its own, as a user's runs are: (exit status, stderr)."""
    result = subprocess.run([sys.executable, str(TRAINER), *argv], capture_output=True, text=True)
    return result.returncode, result.stderr


def train(args, log_dir, compile_mode, deterministic, *extra):
    argv = ["--data_root", args.data_root, "--log_dir", str(log_dir),
            "--max_steps", str(args.steps), "--warmup_steps", "5", "--eval_interval", "0", "--eval_steps", "1",
            "--checkpoint_interval", str(args.resume_at), "--num_samples", "1", "--max_new_tokens", "2",
            "--compile", compile_mode, *(["--deterministic"] if deterministic == "on" else []),
            *(args.extra or ["--model", "gpt2", "--seq_len", "1024", "--micro_batch_size", "16",
                             "--total_batch_size", "32768"]), *extra]
    status, stderr = run_trainer(argv)
    if status != 0:
        raise cli.UserError(f"a run failed (train_gpt2.py {' '.join(argv)}):\n{stderr[-2000:]}")


def run(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--data_root", required=True, help="shards to train on (python -m scripts.prepare_data --source tinyshakespeare)")
    p.add_argument("--compile", nargs="+", default=["none", "default"], help="compile modes to check")
    p.add_argument("--deterministic", nargs="+", default=["off", "on"], choices=["off", "on"], help="train_gpt2.py --deterministic")
    p.add_argument("--steps", type=cli.positive_int, default=20, help="steps per run")
    p.add_argument("--resume_at", type=cli.positive_int, default=10, help="the checkpoint run C resumes from")
    p.add_argument("--dir", default=None, help="where the runs are written (default: a temp dir)")
    p.add_argument("extra", nargs="*", help="train_gpt2.py flags after --, e.g. -- --model d2 --device cpu "
                   "(default: --model gpt2 --seq_len 1024 --micro_batch_size 16 --total_batch_size 32768)")
    args = p.parse_args(argv)
    if args.resume_at >= args.steps - 1:
        p.error(f"--resume_at {args.resume_at} leaves no step to compare before --steps {args.steps}")
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_determinism_"))
    print(f"{'compile':<9}{'determ.':<9}{f'2 runs: equal of {args.steps}':>22}{'max diff':>11}"
          f"{f'resume: equal of {args.steps - args.resume_at - 1}':>20}{'max diff':>11}{'tok/s (median)':>16}", flush=True)
    for compile_mode in args.compile:
        for deterministic in args.deterministic:
            name = root / f"{compile_mode}-{deterministic}"
            for which in ("a", "b"):
                train(args, f"{name}-{which}", compile_mode, deterministic)
            train(args, f"{name}-c", compile_mode, deterministic,
                  "--resume_from_checkpoint", f"{name}-a/model_{args.resume_at:05d}.pt")
            (a, rate), (b, _), (c, _) = (losses(f"{name}-{which}") for which in "abc")
            resumed = range(args.resume_at + 1, args.steps)
            print(f"{compile_mode:<9}{deterministic:<9}{sum(a[s] == b[s] for s in a):>22}"
                  f"{max(abs(a[s] - b[s]) for s in a):>11.2e}{sum(a[s] == c[s] for s in resumed):>20}"
                  f"{max(abs(a[s] - c[s]) for s in resumed):>11.2e}{statistics.median(rate[len(rate) // 4:]):>16,.0f}",
                  flush=True)


def main(argv=None):
    return cli.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
