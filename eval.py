"""eval.py — evaluation of models: loss and bits per byte on token shards.

Library functions here import only model-side code (kernels, model, data); the command
line loads checkpoints through train.py.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


@torch.no_grad()
def loss_and_bpb(model, loader, n_batches, token_bytes, autocast=None):
    """Mean loss (nats/token) and bits per byte over n_batches of the loader, summed over
    data-parallel ranks. Bits per byte = loss * tokens / (bytes * ln 2), where bytes are
    the UTF-8 bytes the target tokens stand for: unlike loss per token it does not depend
    on the tokenizer, so runs with different vocabularies compare."""
    was_training = model.training
    model.eval()
    device = token_bytes.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, tokens, bytes
    for _ in range(n_batches):
        x, y = (t.to(device) for t in loader.next_batch())
        with autocast or torch.autocast(device.type, enabled=False):
            logits = model(x)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        sums += torch.stack([losses.sum().double(), torch.tensor(y.numel(), device=device, dtype=torch.float64),
                             token_bytes[y].sum().double()])
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    loss_sum, n_tokens, n_bytes = sums.tolist()
    return loss_sum / n_tokens, loss_sum / (n_bytes * math.log(2))
