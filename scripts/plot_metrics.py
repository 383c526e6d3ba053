#!/usr/bin/env python3
"""Plot a run's metrics.jsonl: train and validation loss, HellaSwag accuracy, tokens per second.

    python -m scripts.plot_metrics log                       # -> log/metrics.png
    python -m scripts.plot_metrics log --out run1.png
    python -m scripts.plot_metrics log_a log_b --out compare.png   # runs side by side on the same axes

Needs matplotlib (pip install matplotlib), which training itself does not. A resumed run may have
logged a step twice; the later record wins, as it is the one the run continued from.
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # started as a path: say the command that works, exit 2
    from _as_module import exit_with_module_command  # scripts/ is sys.path[0] here; it imports nothing of ours
    exit_with_module_command(__file__)

PANELS = ("loss", "hellaswag", "throughput")


class PlotError(Exception):
    """Nothing to plot or no way to plot it; the message names the fix."""


def read_metrics(log_dir):
    """{key: {step: value}} from <log_dir>/metrics.jsonl (or that file itself); later lines win."""
    path = Path(log_dir)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} does not exist; give the --log_dir of a training run (it writes metrics.jsonl there)")
    series = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
        if not isinstance(record, dict) or "step" not in record:
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, {})[record["step"]] = value
    if "loss" not in series:
        raise PlotError(f"{path} has no training steps (no \"loss\" records) to plot")
    return {key: dict(sorted(points.items())) for key, points in series.items()}


def smooth(values, window):
    """Centred moving average over `window` points (fewer at the ends): unlike an exponential average
    it does not lag behind a fast-falling loss."""
    half = max(window, 1) // 2
    prefix = list(itertools.accumulate(values, initial=0.0))
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def summary(label, series):
    """'log: 200 steps, val loss 6.640 at step 199, HellaSwag 0.297' for the figure's title."""
    parts = [f"{max(series['loss']) + 1} steps"]
    if "val_loss" in series:
        step, value = list(series["val_loss"].items())[-1]
        parts.append(f"val loss {value:.3f} at step {step}")
    if "hellaswag_acc_norm" in series:
        parts.append(f"HellaSwag acc_norm {list(series['hellaswag_acc_norm'].values())[-1]:.3f}")
    return f"{label}: " + ", ".join(parts)


def plot(runs, out):
    """runs: {label: series from read_metrics}. Writes a PNG with one panel per PANELS entry."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("scripts/plot_metrics.py needs matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(16, 4.6), constrained_layout=True)
    ax_loss, ax_hellaswag, ax_speed = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, (label, series) in zip(itertools.cycle(colors), runs.items()):
        name = f"{label}: " if len(runs) > 1 else ""
        steps, losses = list(series["loss"]), list(series["loss"].values())
        window = max(1, len(steps) // 40)
        ax_loss.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        ax_loss.plot(steps, smooth(losses, window), color=color, linewidth=1.6,
                     label=f"{name}train" + (f" (mean of {window} steps)" if window > 1 else ""))
        if "val_loss" in series:
            ax_loss.plot(list(series["val_loss"]), list(series["val_loss"].values()), "o--", color=color,
                         markersize=4, linewidth=1.2, label=f"{name}val")
        if "hellaswag_acc_norm" in series:
            accs = series["hellaswag_acc_norm"]
            n = next(iter(series.get("hellaswag_n", {}).values()), None)
            ax_hellaswag.plot(list(accs), list(accs.values()), "o-", color=color, markersize=4, clip_on=False,
                              label=f"{name}acc_norm" + (f" (n={n})" if n else ""))
        speed = series.get("tok_per_sec", {})
        if speed:
            speed_steps, speeds = list(speed)[1:] or list(speed), list(speed.values())[1:] or list(speed.values())
            ax_speed.plot(speed_steps, speeds, color=color, alpha=0.25, linewidth=0.8)
            ax_speed.plot(speed_steps, smooth(speeds, window), color=color, linewidth=1.6, label=f"{name}tokens/s")
    ax_loss.set(title="loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    ax_hellaswag.set(title="HellaSwag", xlabel="step", ylabel="acc_norm")
    ax_speed.set(title="throughput", xlabel="step", ylabel="tokens/s")
    ax_speed.text(0.99, 0.02, "first logged step left out (compilation, warm-up)", ha="right", va="bottom",
                  transform=ax_speed.transAxes, color="gray", fontsize="small")
    accs = [acc for series in runs.values() for acc in series.get("hellaswag_acc_norm", {}).values()]
    if accs:
        ax_hellaswag.axhline(0.25, color="gray", linestyle=":", linewidth=1, label="chance (0.25)")
        ax_hellaswag.set_ylim(0, max(0.3, max(accs) * 1.15))  # chance in view, not on the edge
    else:
        ax_hellaswag.text(0.5, 0.5, "no HellaSwag records\n(train with --hellaswag_interval N)", ha="center",
                          va="center", transform=ax_hellaswag.transAxes, color="gray")
        ax_hellaswag.set_yticks([])
    ax_speed.set_ylim(bottom=0)
    ax_speed.yaxis.set_major_formatter(plt.FuncFormatter(lambda value, _: f"{value:,.0f}"))
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle("\n".join(summary(label, series) for label, series in runs.items()), fontsize="medium")
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot train/val loss, HellaSwag and tokens/s from metrics.jsonl to a PNG.")
    p.add_argument("log_dirs", nargs="+", metavar="LOG_DIR", help="--log_dir of a training run (or its metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG to write (default: <first LOG_DIR>/metrics.png)")
    args = p.parse_args(argv)
    try:
        runs = {}
        for log_dir in args.log_dirs:
            label = Path(log_dir).name if Path(log_dir).is_dir() else Path(log_dir).parent.name
            runs[label if label not in runs else str(log_dir)] = read_metrics(log_dir)
        first = Path(args.log_dirs[0])
        out = Path(args.out) if args.out else (first if first.is_dir() else first.parent) / "metrics.png"
        plot(runs, out)
    except PlotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
