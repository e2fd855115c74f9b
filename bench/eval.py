"""Tokens/s of multiple-choice scoring (eval.loglikelihoods): one request at a time against
batched, and batched with shared rows, on two workloads shaped like real benchmarks.

    python bench/eval.py [--size tiny|small] [--questions 64] [--batch 32]

  cloze   HellaSwag-like: a context of ~100 tokens and 4 endings of 10-30 tokens each;
          rows are not shared (each ending is its own row)
  letter  MMLU-like letter mode: a prompt of ~150 tokens and 4 one-token answers A-D;
          shared rows score all four answers from one forward pass

Tokens/s counts the tokens of every request (context + continuation), the work a scorer
without batching or sharing does, so sharing shows as a higher rate. Random weights and
token ids: the speed does not depend on them.
"""
import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as evaluation  # noqa: E402
import model  # noqa: E402

SIZES = {"tiny": dict(vocab_size=4096, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, tie_embeddings=True),
         "small": dict(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4)}


def workload(kind, questions, vocab, rng):
    """Encoded requests as eval.encode_requests returns them: (BOS + context, continuation)."""
    def ids(n):
        return [rng.randrange(7, vocab) for _ in range(n)]
    requests = []
    for _ in range(questions):
        if kind == "cloze":
            context = [0] + ids(rng.randint(80, 120))
            requests += [(context, ids(rng.randint(10, 30))) for _ in range(4)]
        else:
            context = [0] + ids(rng.randint(120, 180))
            requests += [(context, [7 + j]) for j in range(4)]
    return requests


def tokens_per_s(m, requests, batch_size, share_prefix):
    evaluation.loglikelihoods(m, requests[:8], batch_size, share_prefix)  # warm up
    t0 = time.perf_counter()
    evaluation.loglikelihoods(m, requests, batch_size, share_prefix)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return sum(len(c) + len(x) for c, x in requests) / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    m = model.Transformer(model.ModelConfig(max_seq_len=256, **SIZES[args.size])).to(device).eval()
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.size} ({m.num_params() / 1e6:.1f}M params), {args.questions} questions x 4 choices, fp32, {name}")
    print(f"{'workload':<8} {'one at a time':>15} {f'batch {args.batch}':>15} {'+ shared rows':>15} {'speed-up':>9}")
    for kind in ("cloze", "letter"):
        requests = workload(kind, args.questions, m.cfg.vocab_size, random.Random(0))
        single = tokens_per_s(m, requests, 1, False)
        batched = tokens_per_s(m, requests, args.batch, False)
        shared = tokens_per_s(m, requests, args.batch, True)
        print(f"{kind:<8} {single:>11,.0f} t/s {batched:>11,.0f} t/s {shared:>11,.0f} t/s {shared / single:>8.1f}x")


if __name__ == "__main__":
    main()
