"""Mixture-of-Experts speed and memory: one layer forward + backward, dropless (tokens sorted,
fused.grouped_matmul) against capacity mode (padded (E, C, d) buffer, batched matmul) and
against a dense SwiGLU MLP with the same active width (d_ff = top_k x expert width, the same
FLOPs per token); then the grouped matmul alone against a loop of per-expert matmuls.

    python bench/moe.py                                   # GPU if there is one, bf16
    python bench/moe.py --tokens 16384 --d-model 1024 --experts 8 --top-k 2 --expert-ff 1408

On a CPU the grouped matmul is the loop (the Triton kernel runs on GPUs only): the figures
there compare the modes' bookkeeping, not the kernel. Anchors: MegaBlocks reports up to 40%
over Tutel's capacity-based MoE, ScatterMoE about 38% over MegaBlocks (A100).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fused  # noqa: E402
from model import MLP, ModelConfig, MoE  # noqa: E402


def timed(fn, device, repeats):
    """(best seconds of fn, peak memory in MiB above the start on CUDA, else None)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else None
    return best, peak


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-ff", type=int, default=704)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":
        torch.set_num_threads(os.cpu_count())
    base = dict(vocab_size=256, d_model=args.d_model, n_layers=1, n_heads=8, n_kv_heads=8, moe_experts=args.experts,
                moe_top_k=args.top_k, moe_d_ff=args.expert_ff)
    layers = {
        "dropless (grouped matmul)": MoE(ModelConfig(**base)),
        f"capacity {args.capacity_factor}": MoE(ModelConfig(**base, moe_capacity_factor=args.capacity_factor)),
        f"dense MLP, d_ff {args.top_k * args.expert_ff}": MLP(ModelConfig(**{**base, "moe_experts": 0},
                                                                           d_ff=args.top_k * args.expert_ff)),
    }
    x = torch.randn(1, args.tokens, args.d_model, device=device, dtype=dtype, requires_grad=True)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}, {dtype}: {args.tokens} tokens, d_model {args.d_model}, {args.experts} experts of "
          f"{args.expert_ff}, top-{args.top_k}; forward + backward of one layer, best of {args.repeats}\n")
    print("| layer | tokens/s | vs dense | peak memory (MiB) | dropped |")
    print("|---|---|---|---|---|")
    rows = []
    for label, layer in layers.items():
        layer = layer.to(device, dtype)
        for q in layer.parameters():
            torch.nn.init.normal_(q, 0.0, 0.02)

        def step():
            layer(x).float().pow(2).mean().backward()
        seconds, peak = timed(step, device, args.repeats)
        dropped = (layer.stats[2] / layer.stats[4:].sum()).item() if isinstance(layer, MoE) else 0.0
        rows.append((label, args.tokens / seconds, peak, dropped))
    dense = rows[-1][1]
    for label, speed, peak, dropped in rows:
        print(f"| {label} | {speed:,.0f} | {speed / dense:.2f}x | {'n/a' if peak is None else f'{peak:,.0f}'} | "
              f"{dropped:.1%} |")

    # The grouped matmul alone: rows sorted by expert with uneven loads (a softmax of noise).
    loads = torch.softmax(torch.randn(args.experts), 0)
    counts = (loads * args.tokens * args.top_k).long()
    counts[-1] += args.tokens * args.top_k - counts.sum()
    xs = torch.randn(int(counts.sum()), args.d_model, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(args.experts, args.expert_ff, args.d_model, device=device, dtype=dtype, requires_grad=True)
    counts = counts.to(device)
    print(f"\ngrouped matmul, {int(counts.sum())} rows x {args.d_model} -> {args.expert_ff} over {args.experts} "
          "uneven groups, forward + backward:\n")
    print("| | ms | TFLOP/s |")
    print("|---|---|---|")
    flops = 3 * 2 * int(counts.sum()) * args.d_model * args.expert_ff
    for label, fn in (("fused.grouped_matmul", fused.grouped_matmul), ("loop of per-expert matmuls",
                                                                         fused.grouped_matmul_ref)):
        seconds, _ = timed(lambda: fn(xs, w, counts).float().sum().backward(), device, args.repeats)
        print(f"| {label} | {seconds * 1e3:.2f} | {flops / seconds / 1e12:.2f} |")
    if device == "cpu":
        print("\n(on a CPU both rows run the loop: the Triton kernel needs a GPU)")


if __name__ == "__main__":
    main()
