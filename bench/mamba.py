"""Mamba's two sides: the parallel scan for training (fused.selective_scan against the torch
reference, forward + backward) and the recurrence for decoding (tokens/s and cache memory per
sequence of a Mamba model against a same-size transformer, as the context grows).

    python bench/mamba.py                         # GPU if there is one
    python bench/mamba.py --contexts 256,1024,4096 --d-model 768 --layers 12

The Mamba paper reports about 5x a transformer's generation throughput at the same size
(Gu & Dao 2023, figure 8): a transformer's KV cache, and the attention that reads it, grow
with the context; Mamba's state does not.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fused  # noqa: E402
import infer  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402


def best(fn, device, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def cache_bytes(model):
    return sum(b.numel() * b.element_size() for block in model.layers
               for b in (block.attn.cache if hasattr(block, "attn") else block.mamba.cache).buffers())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--contexts", default="128,512,1024")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}, {dtype}\n")

    # The scan alone: d_inner = 2 d_model, 16 states, batch 4 x 512 steps.
    d_inner, L = 2 * args.d_model, 512
    g = torch.Generator().manual_seed(0)
    x, dt = (torch.randn(4, L, d_inner, generator=g).to(device, dtype) for _ in range(2))
    dt = torch.nn.functional.softplus(dt - 4)
    A = -torch.rand(d_inner, 16, generator=g).to(device) - 0.5
    B, C = (torch.randn(4, L, 16, generator=g).to(device, dtype) for _ in range(2))
    D = torch.ones(d_inner, device=device)
    for t in (x, dt, A, B, C, D):
        t.requires_grad_()
    print(f"selective scan, 4 x {L} steps x {d_inner} channels x 16 states, forward + backward:\n")
    print("| | ms |\n|---|---|")
    for label, fn in (("fused.selective_scan", fused.selective_scan), ("torch reference (a loop over time)",
                                                                         fused.selective_scan_ref)):
        ms = best(lambda: fn(x, dt, A, B, C, D).float().sum().backward(), device) * 1e3
        print(f"| {label} | {ms:.1f} |")
    if device == "cpu":
        print("\n(on a CPU both rows run the reference: the Triton kernel needs a GPU)")

    base = dict(vocab_size=4096, d_model=args.d_model, n_layers=args.layers, n_heads=max(1, args.d_model // 64),
                n_kv_heads=max(1, args.d_model // 64), max_seq_len=max(map(int, args.contexts.split(","))) + 64)
    # Twice the layers for Mamba: a Mamba layer holds about half an attention + MLP layer's
    # weights (the paper stacks two Mamba blocks per transformer layer for equal size).
    models = {"transformer": Transformer(ModelConfig(**base)),
              "Mamba": Transformer(ModelConfig(**{**base, "n_layers": 2 * args.layers},
                                               block_pattern="M" * 2 * args.layers))}
    sizes = {k: m.num_params() / 1e6 for k, m in models.items()}
    print(f"\ndecode, batch {args.batch}, {args.new_tokens} new tokens after the context "
          f"(transformer {sizes['transformer']:.1f}M parameters, Mamba {sizes['Mamba']:.1f}M):\n")
    print("| context | transformer tokens/s | cache per sequence | Mamba tokens/s | state per sequence | ratio |")
    print("|---|---|---|---|---|---|")
    for context in map(int, args.contexts.split(",")):
        row = []
        for label, model in models.items():
            model = model.to(device, dtype).eval()
            ids = torch.randint(1, 4096, (args.batch, context), device=device)
            starts = torch.zeros(args.batch, dtype=torch.long, device=device)
            infer.setup_caches(model, args.batch, context + args.new_tokens)
            with torch.no_grad():
                infer.prefill(model, ids, starts)  # not timed: the decode steps after it are
                token = ids[:, -1:]

                def decode():
                    for i in range(args.new_tokens):
                        infer.decode_one_token(model, token, torch.tensor([context + i], device=device), starts)
                seconds = best(decode, device, repeats=2)  # KV positions are rewritten; a Mamba state runs on
            memory = cache_bytes(model) / args.batch
            infer.clear_caches(model)
            row.append((args.batch * args.new_tokens / seconds, memory))
        (t_speed, t_mem), (m_speed, m_mem) = row
        print(f"| {context} | {t_speed:,.0f} | {t_mem / 2**20:.2f} MiB | {m_speed:,.0f} | {m_mem / 2**20:.2f} MiB | "
              f"{m_speed / t_speed:.2f}x |")

if __name__ == "__main__":
    main()
