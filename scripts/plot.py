"""The curves of one or more runs on shared axes, in one PNG: training loss, learning rate,
gradient norm, validation loss and, for Mixture-of-Experts runs, each expert's load.

    python scripts/plot.py RUN_DIR [RUN_DIR ...] [--out curves.png] [--report RUN_DIR/report.md]

Reads each run's metrics.jsonl; --report appends the image to a report.md (the demo's
loss curve). Needs matplotlib, an optional extra (pip install matplotlib).
"""
import argparse
import importlib.util
import json
import os
import sys

PANELS = [("loss", "training loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"),
          ("val_loss", "validation loss"), ("moe_load", "expert load (x experts; 1 is even)")]


def read_metrics(run_dir):
    """The step records of a run (events left out)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise ValueError(f"{run_dir}: no metrics.jsonl")
    with open(path) as f:
        return [r for r in map(json.loads, f) if "event" not in r]


def plot_runs(run_dirs, out):
    """One panel per quantity any run logged, a line per run (per expert for the load); the
    figure is written to out and returned."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {os.path.basename(os.path.normpath(d)) or d: read_metrics(d) for d in run_dirs}
    panels = [(k, title) for k, title in PANELS if any(k in r for recs in runs.values() for r in recs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for name, recs in runs.items():
            points = [(r["step"], r[key]) for r in recs if key in r]
            if not points:
                continue
            steps, values = zip(*points)
            if key == "moe_load":
                for e, load in enumerate(zip(*values)):
                    ax.plot(steps, load, label=f"{name} expert {e}", linewidth=0.8)
            else:
                ax.plot(steps, values, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        if key in ("loss", "val_loss", "grad_norm"):
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="curves.png")
    p.add_argument("--report", help="append the image to this report.md (written next to it)")
    args = p.parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:
        sys.exit("scripts/plot.py needs matplotlib: pip install matplotlib")
    out = os.path.join(os.path.dirname(args.report), os.path.basename(args.out)) if args.report else args.out
    try:
        plot_runs(args.runs, out)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if args.report:
        with open(args.report, "a") as f:
            f.write(f"\n![training curves]({os.path.basename(out)})\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
