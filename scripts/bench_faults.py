"""Goodput under faults: an uninterrupted torchrun run against runs that torchrun's elastic agent
restarts (--max-restarts) after kill -9, and optionally SIGSTOP, of a random rank at random instants.

    python -m scripts.bench_faults                                 # 2 gloo ranks, a tiny model, 2 kills, 80 steps
    python -m scripts.bench_faults --kills 3 --stops 1 --hang_timeout 10
    python -m scripts.bench_faults --checkpoint_interval 5 10 20 40   # which interval wins at this fault rate
    python -m scripts.bench_faults --device cuda --model gpt2 --nproc 1 ...   (docs/FAILURES.md has the command)

Faults land at random instants inside steps chosen at random (--seed; the same instants for every
interval). A table: wall time, time in useful steps (the step time of each step's last run; the
first runs of redone steps, restarts, start-up, saves and evaluation are the rest), goodput (their
ratio), steps redone and recovery time (fault -> the next finished step) per fault, and whether the
per-step losses equal the uninterrupted run's. Its last line reads
    goodput NN.N% ... losses identical to an uninterrupted run: yes|no
With several intervals it also prints the interval Young and Daly's sqrt(2 x save cost x MTBF)
predicts from the measured save cost and this run's fault rate. Linux (finds the ranks in /proc).
Extra train_gpt2.py flags follow `--`.
"""
import contextlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__" and not __package__:  # started as a path: say the command that works, exit 2
    from _as_module import exit_with_module_command  # scripts/ is sys.path[0] here; it imports nothing of ours
    exit_with_module_command(__file__)

import cli  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.01  # how often metrics.jsonl and torchrun's workers are looked at
# A tiny model for the CPU (test_restarts.py's): one layer, 64 wide, 16-token sequences.
CPU_MODEL = ["--n_layer", "1", "--n_embd", "64", "--n_head", "2", "--block_size", "32", "--seq_len", "16",
             "--micro_batch_size", "2", "--total_batch_size", "64", "--num_threads", "1"]


class BenchError(cli.UserError):
    """A run of the benchmark failed or could not be measured."""


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--nproc", type=cli.positive_int, default=2, help="ranks (torchrun --nproc_per_node)")
    p.add_argument("--kills", type=int, default=2, help="kill -9 of a random rank, at random instants")
    p.add_argument("--stops", type=int, default=0,
                   help="SIGSTOP of a random rank (a hang: needs --hang_timeout; torchrun SIGKILLs it 30 s after "
                        "the survivors' watchdog exits)")
    p.add_argument("--max_steps", type=cli.positive_int, default=80, help="steps of each run")
    p.add_argument("--checkpoint_interval", type=cli.positive_int, nargs="+", default=[10],
                   help="steps between checkpoints; several: one faulty run each, with the same faults")
    p.add_argument("--hang_timeout", type=float, default=None,
                   help="train_gpt2.py --hang_timeout for the faulty runs (default: 10 with --stops, else the trainer's)")
    p.add_argument("--model", default="d2", help="train_gpt2.py --model (d2: with the tiny CPU shapes below)")
    p.add_argument("--device", default="cpu", help="train_gpt2.py --device (cpu: gloo ranks)")
    p.add_argument("--data_root", default=None, help="shards to train on (default: random tokens, written for the run)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault instants and the ranks hit")
    p.add_argument("--work_dir", default=None,
                   help="keep the runs here: outputs, metrics, failure logs (default: a temp dir, removed after); "
                        "each run's checkpoints are deleted when it ends, so the disk holds one run's at a time")
    p.add_argument("--timeout", type=float, default=600, help="seconds a run may take before it counts as failed")
    p.add_argument("extra", nargs="*", help="train_gpt2.py flags after --, e.g. -- --compile none --deterministic")
    args = p.parse_args(argv)
    if args.kills < 0 or args.stops < 0:
        p.error("--kills and --stops count faults: 0 or more")
    if args.stops and args.nproc < 2:
        p.error("--stops needs --nproc 2 or more: a stopped rank is found by the others' watchdog")
    if args.stops and args.hang_timeout == 0:
        p.error("--stops needs the hang watchdog: give --hang_timeout SECONDS, not 0")
    if args.kills + args.stops >= args.max_steps - 2:
        p.error(f"--max_steps {args.max_steps} leaves no room for {args.kills + args.stops} faults")
    if args.stops and args.hang_timeout is None:
        args.hang_timeout = 10.0
    return args


# -----------------------------------------------------------------------------
# Runs


def random_shards(folder, tokens):
    """Train/val shards of random token ids: the mechanics are what is measured, not the loss."""
    import numpy as np

    import shards

    rng = np.random.default_rng(0)
    shards.write_shard(shards.shard_path(folder, "bench", "train", 0), rng.integers(0, 50257, tokens))
    shards.write_shard(shards.shard_path(folder, "bench", "val", 0), rng.integers(0, 50257, 20_000))
    return folder


def batch_tokens(args):
    """Tokens per step: enough random tokens for every step, so that no epoch ends inside the run."""
    flags = (CPU_MODEL if args.model == "d2" else []) + args.extra
    given = [flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag in ("--total_batch_size", "--total-batch-size")]
    return int(given[-1]) if given else 524288  # the recipe's


def train_flags(args, data_root, log_dir, interval):
    shapes = CPU_MODEL if args.model == "d2" else []
    return ["--data_root", str(data_root), "--log_dir", str(log_dir), "--model", args.model, "--device", args.device,
            *shapes, "--max_steps", str(args.max_steps), "--warmup_steps", "2", "--checkpoint_interval", str(interval),
            "--eval_interval", "0", "--eval_steps", "1", "--num_samples", "1", "--max_new_tokens", "2", *args.extra]


def torchrun(args, flags, restarts):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
            f"--max-restarts={restarts}", str(REPO_ROOT / "train_gpt2.py"), *flags]


def workers(torchrun_pid):
    """{rank: pid} of torchrun's running workers (Linux: their RANK, read from /proc)."""
    found = {}
    try:
        children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    except OSError:
        return found
    for pid in map(int, children):
        try:
            environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "RANK" in environ and state not in "ZX":
            found[int(environ["RANK"])] = pid
    return found


@dataclass
class Fault:
    kind: str  # "kill" or "stop"
    target: int  # injected once a step this far has finished for the first time
    fraction: float  # ... this far into the next step
    victim_pick: float  # which rank: its place in the list of ranks
    at: float = None  # seconds from the run's start
    rank: int = None
    last_step: int = None  # the newest finished step when it hit
    restarted: float = None  # seconds from the run's start to the next attempt's processes
    resumed_at: int = None  # the first step of the next attempt
    recovered: float = None  # seconds from the fault to the next attempt's first finished step

    @property
    def redone(self):
        return None if self.resumed_at is None else self.last_step - self.resumed_at + 1

    @property
    def recovery_s(self):
        return None if self.recovered is None else self.recovered - self.at


@dataclass
class Run:
    name: str
    wall_s: float
    steps: dict  # step -> (loss, step seconds) of its last run
    seen: list  # (seconds since start, step) of every finished step, in order
    faults: list = field(default_factory=list)

    @property
    def useful_s(self):
        return sum(dt for _, dt in self.steps.values())


class MetricsTail:
    """The loss lines rank 0 appends to metrics.jsonl, read as they come."""

    def __init__(self, path):
        self.path, self.offset, self.partial = Path(path), 0, ""

    def new_steps(self):
        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()  # a line still being written
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by kill -9
            if "loss" in record:
                yield record["step"], record["loss"], record["dt_ms"] / 1000


def run(args, name, cmd, log_dir, faults=()):
    """Run cmd (torchrun) for up to --timeout s; inject the faults; return what was seen. Its output goes to a file."""
    output = Path(log_dir).with_suffix(".out")  # torchrun's output, next to the run's folder
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    tail, steps, seen, pending, stopped = MetricsTail(Path(log_dir) / "metrics.jsonl"), {}, [], list(faults), []
    step_times, current, waiting = [], set(), None  # waiting: the fault whose recovery is not seen yet
    t0 = time.monotonic()
    with open(output, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True)
    try:
        while proc.poll() is None:
            now = time.monotonic() - t0
            if now > args.timeout:
                raise BenchError(f"{name}: not finished after {args.timeout:.0f} s (see {output})")
            running = workers(proc.pid)
            whole = len(running) == args.nproc
            if whole and not set(running.values()) & current:  # a new attempt: none of its pids is an old one
                current = set(running.values())
                if waiting is not None:
                    waiting.restarted = now
            for step, loss, dt in tail.new_steps():
                steps[step] = (loss, dt)
                seen.append((now, step))
                step_times.append(dt)
                if waiting is not None and waiting.restarted is not None:  # the new attempt's first step
                    waiting.resumed_at, waiting.recovered, waiting = step, now, None
            if pending and waiting is None and whole and max(steps, default=-1) >= pending[0].target:
                fault = pending.pop(0)
                time.sleep(fault.fraction * (statistics.median(step_times[-10:]) if step_times else 0))
                ranks = sorted(running)
                fault.rank = ranks[int(fault.victim_pick * len(ranks))]
                fault.at, fault.last_step = time.monotonic() - t0, max(steps)
                os.kill(running[fault.rank], signal.SIGKILL if fault.kind == "kill" else signal.SIGSTOP)
                if fault.kind == "stop":
                    stopped.append(running[fault.rank])
                waiting = fault
            time.sleep(POLL_S)
        for step, loss, dt in tail.new_steps():
            steps[step] = (loss, dt)
            seen.append((time.monotonic() - t0, step))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in stopped:  # torchrun SIGKILLs them; this is for a run that failed first
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    wall = time.monotonic() - t0
    for path in Path(log_dir).glob("*.pt"):  # only the losses are compared: free the disk for the next run
        path.unlink()
    if proc.returncode != 0:
        raise BenchError(f"{name} exited with {proc.returncode}; the last lines of {output}:\n"
                         + "\n".join(output.read_text().splitlines()[-15:]))
    return Run(name, wall, steps, seen, list(faults))


def save_cost(reference, interval, max_steps):
    """Seconds a checkpoint holds training up, from the reference run: the gap between the line of a
    step that saved and the next one's, less that step's own time (the median over the saves)."""
    times = dict((step, t) for t, step in reference.seen)
    gaps = [times[s + 1] - times[s] - reference.steps[s + 1][1] for s in range(interval, max_steps - 1, interval)
            if s in times and s + 1 in times]
    plain = [times[s + 1] - times[s] - reference.steps[s + 1][1] for s in range(1, max_steps - 1)
             if s % interval and s in times and s + 1 in times]
    if not gaps:
        return None
    return max(0.0, statistics.median(gaps) - (statistics.median(plain) if plain else 0.0))


# -----------------------------------------------------------------------------
# The table


def row(run, reference):
    identical = run.steps.keys() == reference.steps.keys() and all(
        run.steps[s][0] == reference.steps[s][0] for s in reference.steps)
    hit = [f for f in run.faults if f.at is not None]
    redone = [f.redone for f in hit if f.redone is not None]
    recovery = [f.recovery_s for f in hit if f.recovery_s is not None]
    return dict(run=run.name, wall=run.wall_s, useful=run.useful_s, goodput=100 * run.useful_s / run.wall_s,
                faults=len(hit), redone=statistics.mean(redone) if redone else None,
                recovery=statistics.mean(recovery) if recovery else None, identical=identical,
                difference=max((abs(run.steps[s][0] - reference.steps[s][0]) for s in reference.steps if s in run.steps),
                               default=None))


def print_table(rows):
    print(f"{'run (checkpoint every N steps)':<30} {'wall s':>7} {'useful s':>9} {'goodput':>8} {'faults':>6} {'redone/fault':>12} "
          f"{'recovery s':>10}  losses as uninterrupted")
    for r in rows:
        redone = "-" if r["redone"] is None else f"{r['redone']:.1f}"
        recovery = "-" if r["recovery"] is None else f"{r['recovery']:.1f}"
        same = "yes" if r["identical"] else f"no (max diff {r['difference']:.3g})"
        print(f"{r['run']:<30} {r['wall']:>7.1f} {r['useful']:>9.1f} {r['goodput']:>7.1f}% {r['faults']:>6} "
              f"{redone:>12} {recovery:>10}  {same}")


def print_faults(run):
    """One line per fault: what hit which rank when, and what it cost."""
    for f in run.faults:
        if f.at is None:
            print(f"  {run.name}: {f.kind} did not land before the run ended (step {f.target})")
            continue
        resumed = "-" if f.resumed_at is None else f"{f.resumed_at}"
        redone = "-" if f.redone is None else f"{f.redone}"
        recovery = "-" if f.recovery_s is None else f"{f.recovery_s:.1f} s"
        print(f"  {run.name}: {'kill -9' if f.kind == 'kill' else 'SIGSTOP'} of rank {f.rank} at {f.at:.1f} s, "
              f"after step {f.last_step}; resumed at step {resumed}, {redone} steps redone, next step {recovery} later")


def print_tradeoff(intervals, runs, rows, cost, step_s, max_steps):
    """The waste the checkpoint interval sets (saves, and steps redone after faults) beside Young and
    Daly's optimum sqrt(2 x save cost x MTBF): what is left (restarts, start-up) does not depend on it."""
    print(f"{'interval':>8} {'saves':>6} {'save s':>7} {'redone steps':>12} {'redone s':>9} {'both s':>7} {'goodput':>8}")
    for interval, run, r in zip(intervals, runs, rows):
        saves = sum(1 for _, step in run.seen if (step > 0 and step % interval == 0) or step == max_steps - 1)
        redone = sum(f.redone or 0 for f in run.faults)
        print(f"{interval:>8} {saves:>6} {saves * cost:>7.2f} {redone:>12} {redone * step_s:>9.2f} "
              f"{saves * cost + redone * step_s:>7.2f} {r['goodput']:>7.1f}%")
    mtbf = statistics.mean(r["wall"] / r["faults"] for r in rows if r["faults"])
    optimum_s = math.sqrt(2 * cost * mtbf)
    print(f"save cost {cost:.3f} s, step {step_s:.3f} s, a fault every {mtbf:.0f} s: Young/Daly's optimum "
          f"sqrt(2 x {cost:.3f} x {mtbf:.0f}) = {optimum_s:.1f} s = every {optimum_s / step_s:.0f} steps")


def faults_for(args):
    """The faults, from --seed: their kinds, steps, instants and ranks, the same for every interval."""
    rng = random.Random(args.seed)
    kinds = ["kill"] * args.kills + ["stop"] * args.stops
    rng.shuffle(kinds)
    targets = sorted(rng.sample(range(1, args.max_steps - 2), len(kinds)))
    spec = [(kind, target, rng.random(), rng.random()) for kind, target in zip(kinds, targets)]
    return lambda: [Fault(*fault) for fault in spec]


def bench(args):
    if not Path("/proc/self/task").exists():
        raise BenchError("bench_faults.py finds torchrun's ranks through /proc: it runs on Linux")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    status = measure(args, work)  # a failed run raises, and its output stays there to be read
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return status


def measure(args, work):
    data_root = args.data_root or random_shards(work / "data", tokens=(args.max_steps + 1) * batch_tokens(args))
    make_faults = faults_for(args)
    restarts = args.kills + args.stops + 1
    hang = ["--hang_timeout", str(args.hang_timeout)] if args.hang_timeout is not None else []
    intervals = args.checkpoint_interval
    print(f"bench_faults: {args.nproc} rank(s) on {args.device}, --model {args.model}, {args.max_steps} steps, "
          f"{args.kills} kill -9 and {args.stops} SIGSTOP at steps {[f.target for f in make_faults()]}, "
          f"--max-restarts={restarts}; runs in {work}")
    flags = train_flags(args, data_root, work / "reference", intervals[0])
    reference = run(args, f"uninterrupted, every {intervals[0]}", torchrun(args, flags, 0), work / "reference")
    rows, runs = [row(reference, reference)], []
    cost = save_cost(reference, intervals[0], args.max_steps)
    for interval in intervals:
        log_dir = work / f"faults_{interval}"
        flags = train_flags(args, data_root, log_dir, interval) + ["--auto_resume"] + hang
        runs.append(run(args, f"faults, every {interval}", torchrun(args, flags, restarts), log_dir, make_faults()))
        rows.append(row(runs[-1], reference))
    print_table(rows)
    for faulty in runs:
        print_faults(faulty)
    step_s = statistics.median(dt for _, dt in reference.steps.values())
    faulty_rows = rows[1:]
    if cost is not None and any(r["faults"] for r in faulty_rows):
        print_tradeoff(intervals, runs, faulty_rows, cost, step_s, args.max_steps)
    best = max(zip(intervals, faulty_rows), key=lambda pair: pair[1]["goodput"])
    redone = [r["redone"] for r in faulty_rows if r["redone"] is not None]
    recovery = [r["recovery"] for r in faulty_rows if r["recovery"] is not None]
    identical = all(r["identical"] for r in faulty_rows)
    print(f"goodput {best[1]['goodput']:.1f}% at --checkpoint_interval {best[0]} (uninterrupted "
          f"{rows[0]['goodput']:.1f}%) with {best[1]['faults']} fault(s) in {best[1]['wall']:.0f} s; "
          f"{statistics.mean(redone) if redone else 0:.1f} steps redone and "
          f"{statistics.mean(recovery) if recovery else 0:.1f} s to recover per fault; "
          f"losses identical to an uninterrupted run: {'yes' if identical else 'no'}")
    return 0


def main(argv=None):
    return cli.main(lambda a: bench(parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
