"""Checkpoints: how long training stalls for one, and what saving and loading cost per rank.

    python bench/checkpoint.py [--data "runs/demo/tokens/train_*.bin"] [--d-model 768 --layers 12]
    python bench/checkpoint.py --scale [--config configs/llama-1b.toml --stages 4]

Trains a model of a few hundred MB (weights + AdamW moments) for a few steps with a
checkpoint every other step, once writing synchronously and once from a CPU snapshot on a
background thread, and prints the stall of each checkpoint (from train.py's "checkpoint"
events) and the step time while a write is in flight. Needs token shards: run demo.sh
first, or pass --data.

--scale: the model of --config (llama-1b) cut into --stages pipeline stages, fp32 weights and
AdamW moments, saved and loaded by each stage's rank, one rank at a time in a fresh process
so that its peak resident memory (ru_maxrss) is its own: checkpoint.py's sharded path (each
rank writes its pieces, then reads back the boxes it holds) against the consolidated one
this codebase used before (every rank's tensors gathered to rank 0, written as two whole
files; every rank then loads both whole files and keeps its slice). The gather itself is not
timed, only what rank 0 then holds and writes.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from config import config_from_dict  # noqa: E402


def run(args, asynchronous, out_dir):
    cfg = config_from_dict({
        "model": dict(vocab_size=32000, d_model=args.d_model, n_layers=args.layers, n_heads=args.d_model // 64,
                      n_kv_heads=args.d_model // 64, max_seq_len=args.seq),
        "data": dict(train=args.data, seq_len=args.seq, micro_batch=1),
        "optim": dict(steps=args.steps, warmup=1),
        "checkpoint": dict(every=2, keep=1, asynchronous=asynchronous),
        "log": dict(dir=out_dir, every=1), "eval": dict(val_every=0)})
    train.train(cfg)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    stalls = [r["stall_s"] for r in records if r.get("event") == "checkpoint"][:-1]  # not the final one
    steps = {r["step"]: r["elapsed_s"] for r in records if "loss" in r and "event" not in r}
    step_times = [steps[s] - steps[s - 1] for s in sorted(steps) if s - 1 in steps]
    return stalls, step_times


def main():
    args = parse()
    if args.worker:
        return scale_worker(args)
    if args.scale:
        print(f"{os.path.basename(args.config)} as {args.stages} pipeline stages, fp32 weights + AdamW moments\n\n"
              "| path | phase | rank | seconds | peak host GiB |\n|---|---|---|---|---|")
        return scale(args)
    results = {}
    for asynchronous in (False, True):
        with tempfile.TemporaryDirectory() as d:
            results[asynchronous] = run(args, asynchronous, d)
    sizes = 32000 * args.d_model * 2 + args.layers * 12 * args.d_model ** 2
    print(f"\nmodel ~{sizes / 1e6:.0f}M parameters: ~{sizes * 12 / 2**30:.2f} GiB per checkpoint "
          "(fp32 weights + two AdamW moments)")
    print(f"{'checkpoint':<14} {'stall per checkpoint (s)':>26} {'median step time (s)':>22}")
    for asynchronous, (stalls, step_times) in results.items():
        print(f"{'asynchronous' if asynchronous else 'synchronous':<14} "
              f"{statistics.median(stalls):>26.2f} {statistics.median(step_times):>22.2f}")
    ratio = statistics.median(results[False][0]) / statistics.median(results[True][0])
    print(f"stall ratio sync / async: {ratio:.1f}x")


def stage(args, rank):
    """One rank's part of the model with AdamW moments, built as train.py builds it."""
    import torch

    import checkpoint
    import parallel
    from config import load_config
    cfg = load_config(args.config, [f"parallel.pp={args.stages}", "parallel.dp=1", "parallel.tp=1"])
    grid = parallel.Grid(pp=args.stages, pp_rank=rank)
    model = checkpoint.build_model(cfg, "cpu", grid=grid)
    named = [(parallel.canonical(n, grid), p) for n, p in model.named_parameters()]
    optimizer = torch.optim.AdamW([p for _, p in named])
    for _, p in named:
        optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}
    return cfg, grid, model, named, optimizer


def scale_worker(args):
    """--worker WAY RANK: save or load one rank's share, print seconds and peak GiB as JSON."""
    import torch
    from safetensors.torch import load_file, save_file

    import checkpoint
    way, rank, out = args.worker[0], int(args.worker[1]), args.out
    cfg, grid, model, named, optimizer = stage(args, rank)
    t0 = time.perf_counter()
    if way == "sharded-save":
        pieces = checkpoint.snapshot(model, named, optimizer, grid, 0)
        index = {}
        for kind, entries in pieces.items():
            name = f"{kind}-{rank:05d}.safetensors"
            save_file({f"{key}#{i}": t for i, (key, _, _, t) in enumerate(entries)}, os.path.join(out, name))
            checkpoint.file_sha256(os.path.join(out, name))
            index[kind] = {key: [shape, box, name, f"{key}#{i}"] for i, (key, shape, box, _) in enumerate(entries)}
        with open(os.path.join(out, f"index-{rank}.json"), "w") as f:
            json.dump(index, f)
    elif way == "sharded-load":
        checkpoint.fill(model, model.named_parameters(), checkpoint.checkpoint_source(out), grid, out)
        checkpoint.load_optimizer_state(optimizer, named, out, grid)
    elif way == "consolidated-save":  # rank 0 after the gather: every stage's tensors, then two files
        weights, moments = {}, {}
        for r in range(args.stages):
            _, g, _, nm, opt = stage(args, r) if r else (cfg, grid, model, named, optimizer)
            for name, p in nm:
                if not (name == "embed.weight" and not g.first):
                    weights[name] = p.detach()
                    moments.update({f"{name}.{k}": v for k, v in opt.state[p].items()})
        t0 = time.perf_counter()
        for name, tensors in (("model.safetensors", weights), ("optimizer.safetensors", moments)):
            save_file(tensors, os.path.join(out, name))
            checkpoint.file_sha256(os.path.join(out, name))
    else:  # consolidated-load: the whole files, then this rank's slice
        weights, moments = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(out,
                                                                                              "optimizer.safetensors"))
        with torch.no_grad():
            for name, p in named:
                p.copy_(weights[name])
                optimizer.state[p] = {k: moments[f"{name}.{k}"] for k in ("exp_avg", "exp_avg_sq", "step")}
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def merge_index(out, stages):
    """What rank 0 writes once the ranks' piece lists are gathered: one index.json."""
    index = {"model": {}, "optimizer": {}}
    for rank in range(stages):
        with open(os.path.join(out, f"index-{rank}.json")) as f:
            for kind, tensors in json.load(f).items():
                for key, (shape, box, file, stored) in tensors.items():
                    index[kind].setdefault(key, {"shape": shape, "pieces": []})["pieces"].append([file, stored, box])
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f)


def scale(args):
    rows = []
    for way in ("sharded", "consolidated"):
        with tempfile.TemporaryDirectory(dir=args.tmp) as out:
            for phase in ("save", "load"):
                if phase == "load" and way == "sharded":
                    merge_index(out, args.stages)
                ranks = [0] if (way, phase) == ("consolidated", "save") else range(args.stages)
                for rank in ranks:
                    r = subprocess.run([sys.executable, __file__, "--config", args.config, "--stages", str(args.stages),
                                        "--out", out, "--worker", f"{way}-{phase}", str(rank)],
                                       capture_output=True, text=True, check=True)
                    rows.append((way, phase, rank, json.loads(r.stdout.strip().splitlines()[-1])))
                    got = rows[-1][3]
                    print(f"| {way} | {phase} | {rank} | {got['seconds']:.1f} | {got['peak_gib']:.2f} |", flush=True)
    return rows


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/demo/tokens/train_*.bin")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--scale", action="store_true", help="sharded against consolidated save and load per rank")
    p.add_argument("--config", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                    "configs", "llama-1b.toml"))
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--tmp", default=None, help="where the checkpoints are written (default: the system's temp)")
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    main()
