"""Decode speed of infer.py side by side in one run: float weights, int8, int4 and speculative
decoding, and transformers' generate on the same model; the share of memory bandwidth that
reading the weights uses; with --val, the perplexity change of int8 and int4.

    python bench/decode.py --checkpoint runs/demo/checkpoints/step_0000600 \
        --draft runs/demo/draft/checkpoints/step_0000300 --val "runs/demo/tokens/val_*.bin"
    python bench/decode.py --checkpoint HF_DIR --device cuda --dtype bfloat16 --batch 1,8 --compile graphs

Every row generates --new-tokens greedy tokens after the same prompt (repeated over the batch);
tokens/s counts new tokens over the whole call, prefill included, best of --repeats after a
warm-up call (which compiles and autotunes). Bandwidth: the bytes one decode step reads (every
weight and scale once; the KV cache, small at these lengths, left out) x steps/s, over the
device's copy bandwidth measured here. Anchors (gpt-fast, Llama-2-7B, A100, batch 1): 105
tokens/s bf16, 156 int8, 197 int4; on an H100 the 7B bf16 roofline is about 248 tokens/s.
"""
import argparse
import copy
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import eval as evaluate  # noqa: E402
import infer  # noqa: E402


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device, mb=256):
    """Bytes per second a large device-to-device copy moves (read + write)."""
    x = torch.empty(mb * 2 ** 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * 5 / (time.perf_counter() - t0)


def bytes_per_step(model):
    """Bytes of weights one decode step reads: every parameter and quantized buffer once. The
    embedding is a lookup of a few rows, unless the head is tied to it and reads it all."""
    skip = set() if model.cfg.tie_embeddings else {"embed.weight"}
    tensors = [t for n, t in [*model.named_parameters(), *model.named_buffers()]
               if n not in skip and not n.startswith("rope_")]
    return sum(t.numel() * t.element_size() for t in tensors)


def best_seconds(fn, device, repeats):
    fn()  # warm-up: compilation, autotuning, allocator
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint or a Hugging Face directory")
    p.add_argument("--draft", help="a smaller model with the same tokenizer, for the speculative row")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help="float32, bfloat16 or float16; default bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt", default="def ")
    p.add_argument("--group-size", type=int, default=64, help="int4's group of inputs")
    p.add_argument("--speculate", type=int, default=4)
    p.add_argument("--compile", choices=("none", "compile", "graphs"), default="none")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--val", help="token shards (a glob) for the perplexity of each weight format")
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--report", help="append the table to this report.md")
    args = p.parse_args()
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    batches = [int(b) for b in args.batch.split(",")]
    N = args.new_tokens
    model, tok = infer.load(args.checkpoint, device, dtype)
    prompt = infer.encode(tok, args.prompt)
    bandwidth = copy_bandwidth(device)
    fp = str(dtype).removeprefix("torch.")
    models = {fp: model, "int8": infer.quantize(copy.deepcopy(model), "int8"),
              "int4": infer.quantize(copy.deepcopy(model), "int4", args.group_size)}
    rows = []  # (name, batch, tokens/s, bytes per step, perplexity, note)

    def ours(m, B):
        return lambda: infer.generate(m, [prompt] * B, N, compile=args.compile)
    for name, m in models.items():
        ppl = evaluate.shards_bpb(m, args.val, args.val_batches)["perplexity"] if args.val else None
        for B in batches:
            rows.append((name, B, B * N / best_seconds(ours(m, B), device, args.repeats), bytes_per_step(m), ppl, ""))
    if args.draft:
        draft, draft_tok = infer.load(args.draft, device, dtype)
        if tok.get_vocab() != draft_tok.get_vocab():
            raise SystemExit(f"error: {args.draft}: the draft's tokenizer is not the model's")
        stats = []

        def speculative():
            out, counts = infer.speculative_decode(model, draft, prompt, N, k=args.speculate)
            stats.append((len(out), *counts))
        seconds = best_seconds(speculative, device, args.repeats)
        n, accepted, calls = stats[-1]
        weights = bytes_per_step(model) + bytes_per_step(draft)
        rows.append((f"{fp} + draft (k={args.speculate})", 1, n / seconds, weights, None,
                     f"{accepted / (calls * args.speculate):.0%} of drafted tokens accepted, "
                     f"{n / calls:.2f} tokens per model forward"))
    try:
        import transformers
    except ImportError:  # a test-only dependency: its row is left out
        transformers = None
        print("transformers is not installed: no row for its generate")
    if transformers:
        with tempfile.TemporaryDirectory() as d:
            checkpoint.save_hf(model, d, dtype)
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
        for B in batches:
            ids = torch.tensor([prompt] * B, device=device)
            seconds = best_seconds(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N,
                                                       min_new_tokens=N, do_sample=False, pad_token_id=0),
                                   device, args.repeats)
            rows.append((f"transformers {transformers.__version__} generate, {fp}", B, B * N / seconds,
                         bytes_per_step(model), None, ""))

    base = {B: s for name, B, s, *_ in rows if name == fp}
    lines = [f"Decode on {torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'} "
             f"({torch.get_num_threads()} threads), {N} new tokens after {len(prompt)}, greedy, "
             f"compile={args.compile}; "
             f"copy bandwidth {bandwidth / 1e9:.1f} GB/s.", "",
             "| weights | batch | tokens/s | vs ours " + fp + " | weight reads, % of bandwidth | perplexity | |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, B, speed, nbytes, ppl, note in rows:
        used = nbytes * speed / B / bandwidth  # steps/s = tokens/s / batch
        lines.append(f"| {name} | {B} | {speed:.1f} | {speed / base[B]:.2f}x | {used:.1%} | "
                     f"{'' if ppl is None else f'{ppl:.3f}'} | {note} |")
    print("\n".join(lines))
    if args.report:
        with open(args.report, "a") as f:
            f.write("\n## Decoding\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
