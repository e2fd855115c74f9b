"""How long the training loop stalls for a checkpoint, synchronous vs asynchronous.

    python bench/checkpoint.py [--data "runs/demo/tokens/train_*.bin"] [--d-model 768 --layers 12]

Trains a model of a few hundred MB (weights + AdamW moments) for a few steps with a
checkpoint every other step, once writing synchronously and once from a CPU snapshot on a
background thread, and prints the stall of each checkpoint (from train.py's "checkpoint"
events) and the step time while a write is in flight. Needs token shards: run demo.sh
first, or pass --data.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/demo/tokens/train_*.bin")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=9)
    args = p.parse_args()
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


if __name__ == "__main__":
    main()
