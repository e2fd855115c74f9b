"""Forward+backward tokens/s of model.py against transformers' LlamaForCausalLM with the
same config, batch and device, and the ratio (ours / theirs).

    python bench/train_step.py [--size tiny|125m] [--batch 8] [--seq 256] [--steps 10]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402

SIZES = {"tiny": dict(vocab_size=4096, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2),
         "small": dict(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4),
         "125m": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12)}


def tokens_per_s(fwd_bwd, x, y, steps, device):
    for _ in range(2):  # warm up (allocator, kernels, compile)
        fwd_bwd(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fwd_bwd(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return x.numel() * steps / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    import tempfile

    import transformers
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    ours = model.Transformer(model.ModelConfig(max_seq_len=args.seq, **SIZES[args.size]))
    with tempfile.TemporaryDirectory() as d:
        model.save_hf(ours, d)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa")
    ours, theirs = ours.to(device), theirs.to(device)
    x = torch.randint(0, ours.cfg.vocab_size, (args.batch, args.seq), device=device)
    y = torch.roll(x, -1, 1)

    def ours_step(x, y):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            ours(x, y).backward()

    def theirs_step(x, y):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            theirs(input_ids=x, labels=x).loss.backward()  # transformers shifts labels itself

    a = tokens_per_s(ours_step, x, y, args.steps, device)
    b = tokens_per_s(theirs_step, x, y, args.steps, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.size} ({ours.num_params() / 1e6:.1f}M params), batch {args.batch} x {args.seq}, {dtype}, {name}")
    print(f"model.py      {a:>10,.0f} tokens/s")
    print(f"transformers  {b:>10,.0f} tokens/s")
    print(f"ratio         {a / b:>10.2f}x")


if __name__ == "__main__":
    main()
