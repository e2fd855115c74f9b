"""Collective bandwidth over message sizes, reported the way nccl-tests does, to validate a
cluster before a long run.

    torchrun --nproc-per-node 8 bench/comm.py [--max-mb 1024] [--iters 20]
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 bench/comm.py

algbw = bytes / time. busbw rescales algbw by the traffic each rank's link carries in a
ring so it compares with the link's peak whatever the number of ranks (nccl-tests'
PERFORMANCE.md): all-reduce 2(n-1)/n, all-gather and reduce-scatter (n-1)/n, send/recv 1.
NCCL on GPUs, gloo on CPUs.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist


def bench(fn, iters, device):
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-mb", type=float, default=0.25)
    p.add_argument("--max-mb", type=float, default=256)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    n, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda" if cuda else "cpu")
    if rank == 0:
        print(f"{n} ranks, {dist.get_backend()}, "
              f"{torch.cuda.get_device_name() if cuda else 'CPU'}; bandwidth in GB/s (algbw / busbw)")
        print(f"{'size':>10} {'all_reduce':>17} {'all_gather':>17} {'reduce_scatter':>17} {'send/recv':>17}")
    mb = args.min_mb
    while mb <= args.max_mb:
        numel = int(mb * 2**20) // 4 // n * n
        x = torch.ones(numel, device=device)
        shard = torch.empty(numel // n, device=device)
        full = torch.empty(numel, device=device)
        peer = rank ^ 1  # pairs (0,1), (2,3), ...: the bandwidth of one link

        def send_recv():
            if peer < n:
                op = dist.isend if rank % 2 == 0 else dist.irecv
                op(x, peer).wait()

        cases = [(lambda: dist.all_reduce(x), 2 * (n - 1) / n),
                 (lambda: dist.all_gather_into_tensor(full, shard), (n - 1) / n),
                 (lambda: dist.reduce_scatter_tensor(shard, x), (n - 1) / n),
                 (send_recv, 1.0)]
        cells = []
        for fn, factor in cases:
            algbw = numel * 4 / bench(fn, args.iters, device) / 1e9
            cells.append(f"{algbw:8.2f} / {algbw * factor:6.2f}")
        if rank == 0:
            print(f"{mb:>8.2f}MB " + " ".join(f"{c:>17}" for c in cells), flush=True)
        mb *= 4
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
