"""A grid of training runs of one config, run one by one or N at a time; their final
validation losses in a table, with the best learning rate of every other setting marked, so
a muP sweep shows whether the optimum stays put as the width grows.

    python scripts/sweep.py --config configs/tiny.toml --grid optim.lr=1e-3,3e-3,1e-2 \
        --grid model.d_model=64,128,256 [--set optim.steps=200] [--parallel 2] [--out runs/sweep]

Each run trains with train.py into OUT/KEY=VALUE,...; its output goes to stdout.log there.
A run that finished (its report.md exists) is skipped and one cut short resumes from its
last checkpoint (--resume auto), so the same command again finishes a half-done sweep.
The table is written to OUT/results.md and OUT/results.jsonl.
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_grid(text):
    key, sep, values = text.partition("=")
    if not sep or key.count(".") != 1 or not values:
        raise SystemExit(f"--grid {text!r}: expected section.key=v1,v2,...")
    return key, values.split(",")


def final_val_loss(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        vals = [r["val_loss"] for r in map(json.loads, f) if "val_loss" in r]
    return vals[-1] if vals else None


def run_all(commands, parallel):
    """Run (run_dir, argv) pairs, at most parallel at once; the return codes by run_dir."""
    pending, running, codes = list(commands), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            run_dir, argv = pending.pop(0)
            os.makedirs(run_dir, exist_ok=True)
            log = open(os.path.join(run_dir, "stdout.log"), "a")
            running[run_dir] = (subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log)
            print(f"started  {os.path.basename(run_dir)}", flush=True)
        for run_dir, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                codes[run_dir] = proc.returncode
                del running[run_dir]
                print(f"finished {os.path.basename(run_dir)} (exit {proc.returncode})", flush=True)
        time.sleep(0.2)
    return codes


def table(rows, keys):
    """Markdown: one row per run, the best learning rate of each setting of the other keys marked."""
    others = [k for k in keys if k != "optim.lr"]
    best = {}
    for r in sorted((r for r in rows if r["val_loss"] is not None), key=lambda r: -r["val_loss"]):
        best[tuple(r[k] for k in others)] = r["run"]  # the lowest loss is written last
    lines = ["| " + " | ".join(keys) + " | final val loss | |", "|" + "---|" * (len(keys) + 2)]
    for r in rows:
        mark = "best lr" if "optim.lr" in keys and best.get(tuple(r[k] for k in others)) == r["run"] else ""
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "failed"
        lines.append("| " + " | ".join(r[k] for k in keys) + f" | {loss} | {mark} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--grid", action="append", required=True, metavar="SECTION.KEY=V1,V2,...")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="for every run")
    p.add_argument("--parallel", type=int, default=1, help="runs at once")
    p.add_argument("--out", default="runs/sweep")
    args = p.parse_args(argv)
    grid = [parse_grid(g) for g in args.grid]
    keys = [k for k, _ in grid]
    out = os.path.abspath(args.out)
    runs, commands = [], []
    for values in itertools.product(*(v for _, v in grid)):
        name = ",".join(f"{k}={v}" for k, v in zip(keys, values))
        run_dir = os.path.join(out, name)
        runs.append((run_dir, dict(zip(keys, values))))
        if os.path.exists(os.path.join(run_dir, "report.md")):
            print(f"done     {name}")
            continue
        sets = [*args.set, *(f"{k}={v}" for k, v in zip(keys, values)), f'log.dir="{run_dir}"']
        commands.append((run_dir, [sys.executable, os.path.join(ROOT, "train.py"), "--config",
                                   os.path.abspath(args.config), *(a for s in sets for a in ("--set", s)),
                                   "--resume", "auto"]))
    codes = run_all(commands, max(1, args.parallel))
    rows = [{"run": os.path.basename(d), **v, "val_loss": final_val_loss(d) if codes.get(d, 0) == 0 else None}
            for d, v in runs]
    text = table(rows, keys)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(text)
    failed = [os.path.basename(d) for d, code in codes.items() if code]
    if failed:
        sys.exit(f"{len(failed)} run(s) failed, see their stdout.log: {', '.join(failed)}")


if __name__ == "__main__":
    main()
