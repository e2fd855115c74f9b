"""Alignment step costs on one model: SFT, DPO with precomputed and with live reference
log-probs, the reward model, and RL rollouts (samples per second).

    python bench/align.py [--checkpoint runs/demo/checkpoints/step_0000600] [--steps 10]

A DPO step runs the policy over two sequences per pair (chosen and rejected), and with a
live reference a second, frozen model over both; SFT runs one sequence per example. Rows:
seconds per optimizer step over the same number of examples (micro_batch conversations or
pairs), the ratio to SFT, and the activation memory autograd keeps for backward (the bytes
of every tensor saved in forward; on a GPU also the peak allocated).
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import align  # noqa: E402
from config import config_from_dict  # noqa: E402


def saved_bytes():
    """A context that counts the bytes autograd saves for backward, and its counter."""
    count = {"bytes": 0}

    def pack(t):
        count["bytes"] += t.numel() * t.element_size()
        return t
    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), count


def measure(cfg, steps):
    run = align.start(cfg)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, memory = [], 0
    for step in range(steps + 1):  # the first step warms up, untimed
        t0 = time.perf_counter()
        if cfg.align.method in align.RL:
            for b in run.loader.batches(step):
                align.rollout(run, b, seed=step)
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            continue
        hooks, count = saved_bytes()
        with hooks:
            align.update(run, align.make_batches(run, step))
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        memory = max(memory, count["bytes"])
    peak = torch.cuda.max_memory_allocated() if run.device.type == "cuda" else None
    return sum(times[1:]) / steps, memory, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/demo/checkpoints/step_0000600")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    args = p.parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        sys.exit(f"{args.checkpoint}: no checkpoint; run demo.sh first or pass --checkpoint")
    tmp = tempfile.mkdtemp()
    align.demo_data(os.path.join(tmp, "data"), n=400)
    base = {"data": dict(seq_len=args.seq_len, micro_batch=args.micro_batch), "optim": dict(steps=10 ** 6, warmup=0),
            "eval": dict(val_every=0), "train": dict(init_from=args.checkpoint)}
    rows = [("sft", dict(method="sft", train="sft.jsonl", pack=False)),
            ("rm", dict(method="rm", train="dpo.jsonl")),
            ("dpo, precomputed reference", dict(method="dpo", train="dpo.jsonl")),
            ("dpo, live reference", dict(method="dpo", train="dpo.jsonl", reference="live")),
            ("grpo rollouts (k=4, 24 new tokens)", dict(method="grpo", train="prompts.jsonl", samples=4,
                                                        max_new_tokens=24, reward="align:list_format_reward"))]
    results = []
    for name, a in rows:
        a["train"] = os.path.join(tmp, "data", a["train"])
        run_dir = os.path.join(tmp, f"run{len(results)}")
        cfg = config_from_dict({**base, "align": a, "log": dict(dir=run_dir)})
        results.append((name, *measure(cfg, args.steps), cfg))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sft_time = results[0][1]
    print(f"\n{device}, micro_batch {args.micro_batch}, seq_len {args.seq_len}, {args.steps} steps each\n")
    print("| step | s/step | vs sft | saved for backward | peak allocated |\n|---|---|---|---|---|")
    for name, t, mem, peak, cfg in results:
        if cfg.align.method in align.RL:
            n = args.micro_batch * cfg.align.samples
            print(f"| {name} | {t:.3f} | {n / t:.0f} samples/s | | |")
            continue
        print(f"| {name} | {t:.3f} | {t / sft_time:.2f}x | {mem / 2**20:.1f} MiB | "
              f"{'' if peak is None else f'{peak / 2**20:.0f} MiB'} |")


if __name__ == "__main__":
    main()
