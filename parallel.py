"""parallel.py — distributed training, applied from outside to model.py's plain model.

Process setup from torchrun's environment, and data parallelism by averaging gradients
across ranks after the last gradient-accumulation micro-step.
"""
import os

import torch
import torch.distributed as dist


def init_distributed():
    """(rank, world_size, local_rank) from torchrun's environment; joins the process group
    when there is more than one process (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, local_rank


def all_reduce_grads(params, group=None):
    """Average gradients over the data-parallel ranks in one flat all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
