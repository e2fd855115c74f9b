"""Training throughput and model FLOPs utilisation of a config under a parallel layout.

    python bench/mfu.py --config configs/llama-125m.toml [--set parallel.tp=2 ...] [--steps 20]
    torchrun --nproc-per-node 8 bench/mfu.py --config configs/llama-1b.toml --set parallel.tp=2

Runs train.py's step (parallel.forward_backward, clipping, AdamW) on random tokens, so no
data is needed, and prints tokens/s per GPU and MFU = 6N+attention FLOPs per token x
tokens/s / peak (model.flops_per_token, train.PEAK_FLOPS). Anchors on one H100: llm.c's
GPT-2 124M at ~470k tokens/s (~41% MFU); torchtitan Llama-3-8B at 33-39% MFU.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import parallel  # noqa: E402
import train  # noqa: E402
from config import load_config  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    cfg = load_config(args.config, args.set)
    rank, world, local_rank = parallel.init_distributed()
    device, autocast = train.setup_device(cfg, local_rank)
    d = cfg.data
    grid = parallel.make_grid(cfg.parallel, cfg.model, d)
    model, dp, named, optimizer = train.build(cfg, grid, device)
    n_params, fpt = train.whole_model_size(cfg)
    times = []
    for step in range(args.warmup + args.steps):
        batches = [(torch.randint(0, cfg.model.vocab_size, (d.micro_batch, d.seq_len), device=device),) * 2
                   for _ in range(d.grad_accum)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        parallel.forward_backward(model, grid, dp, batches, cfg.parallel, autocast)
        parallel.clip_grad_norm(named, cfg.optim.clip, grid, dp.zero)
        optimizer.step()
        dp.after_step()
        dp.zero_grad(model)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tokens = d.seq_len * d.micro_batch * d.grad_accum * grid.dp
    peak = train.peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if rank == 0:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(f"{n_params / 1e6:.0f}M params, {world} x {name}, layout dp{grid.dp} tp{grid.tp} pp{grid.pp} cp{grid.cp}"
              f", {tokens:,} tokens/step: {dt * 1e3:.0f} ms/step, {tokens / dt / world:,.0f} tokens/s per device"
              + (f", MFU {fpt * tokens / dt / (peak * world):.1%}" if peak else "") + mem)
        if grid.pp > 1:  # one schedule per step over every micro-step's micro-batches
            m = d.grad_accum * parallel.microbatches(cfg.parallel, d.micro_batch)
            print(f"pipeline: {cfg.parallel.pp_schedule}, {m} micro-batches per step, bubble (pp - 1) / (m + pp - 1) "
                  f"= {(grid.pp - 1) / (m + grid.pp - 1):.1%} of the step")


if __name__ == "__main__":
    main()
