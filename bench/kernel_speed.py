"""Speed of fused.py's Triton kernels against torch, on a CUDA GPU; prints markdown tables.

    python bench/kernel_speed.py                          # attention and the row-wise ops, bf16
    python bench/kernel_speed.py --only attention --head-dims 128 --seqs 4096,8192
    python bench/kernel_speed.py --only rowwise --dtype fp16

Attention, at a fixed 16k tokens per batch and hidden size 2048 (B = 16k / S, H = 2048 / D:
the FlashAttention-2 paper's setting), S from 512 to 16k, head dim 64 and 128, causal and not:
    ours   fused.attention (Triton, FlashAttention-2)
    sdpa   torch's scaled_dot_product_attention pinned to one backend, named in the table
    eager  softmax(q k^T * scale) v in plain torch (it materialises S x S: OOM is reported)
TFLOP/s counts 4 * B * H * S^2 * D per forward (halved when causal) and 2.5x that for the
backward, so forward+backward is 3.5x; "peak" is the memory allocated above the inputs.
"err" is ours against sdpa: max |difference| of the outputs on the fwd row, of dQ, dK and dV
on the fwd+bwd rows; a check of the compiled bf16 path at full size on top of the tests.

Row-wise ops (RMSNorm, SwiGLU, cross-entropy): GB/s = the bytes that must move (each input
read once, each output written once) / time, for ours, eager (the torch reference) and
torch.compile of the reference, forward and forward+backward, with % of the GPU's HBM peak.

Without CUDA there is nothing to time: the script says so and runs a correctness smoke test
of every kernel under TRITON_INTERPRET=1 instead. That is a correctness path, never a speed.
(bench/compile_kernels.py, which needs no GPU either, reports registers, spills and shared
memory of the compiled kernels.)
"""
import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede fused.py's import of triton
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fused  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# HBM bandwidth, TB/s, from the vendors' datasheets, for the "% of peak" column.
HBM_TBPS = {"H100 SXM": 3.35, "H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "H100 NVL": 3.9, "H200": 4.8,
            "A100-SXM4-80GB": 2.04, "A100 80GB PCIe": 1.94, "A100-SXM4-40GB": 1.56, "A100-PCIE-40GB": 1.56}


def bench_ms(fn, grad_to_none=()):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grad_to_none))


def peak_bytes(fn):
    """Memory allocated by one call of fn beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure(f, args, dout=None):
    """(ms, peak GiB) of f(*args) without autograd (dout None), or of f(*args).backward(dout)."""
    def run():
        if dout is None:
            with torch.no_grad():
                f(*args)
        else:
            f(*args).backward(dout)
    grads = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return bench_ms(run, grads), peak_bytes(run) / 2**30


# ----------------------------------------------------------------------------------------
# Attention

def eager_attention(q, k, v, causal):
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5                          # (B, H, S, S)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def pinned_sdpa(q, k, v, causal):
    """SDPA pinned to the first backend that runs these inputs, and that backend's name."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def fn(q, k, v, causal, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        try:
            fn(q[:1, :1, :128], k[:1, :1, :128], v[:1, :1, :128], causal)
            return fn, backend.name.lower()
        except RuntimeError:
            continue
    return (lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)), "default"


def attention_errors(q, k, v, dout, causal, sdpa):
    """{(impl, pass): max |ours - sdpa|} over the output (fwd) or over dQ, dK, dV (fwd+bwd)."""
    def outputs(f):
        out = f(q, k, v, causal)
        return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]
    want, got = outputs(sdpa), outputs(fused.attention)
    return {("ours", "fwd"): (got[0] - want[0]).abs().max().item(),
            ("ours", "fwd+bwd"): max((g - w).abs().max().item() for g, w in zip(got[1:], want[1:]))}


def attention_table(seqs, head_dims, dtype, tokens, hidden):
    """Prints the table a row at a time (a run cut short by a time limit keeps what it measured)."""
    print("| D   | mask   | S     | BxH   | pass    | impl                     | ms       | TFLOP/s | peak GiB "
          "| err      |\n|-----|--------|-------|-------|---------|--------------------------|----------|---------|"
          "----------|----------|", flush=True)
    for D in head_dims:
        for causal in (True, False):
            for S in seqs:
                B, H = max(1, tokens // S), hidden // D
                q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
                dout = torch.randn_like(q)
                fwd_flops = 4 * B * H * S * S * D / (2 if causal else 1)
                sdpa, sdpa_name = pinned_sdpa(q, k, v, causal)
                impls = {"ours": fused.attention, f"sdpa ({sdpa_name})": sdpa, "eager": eager_attention}
                errs = attention_errors(q, k, v, dout, causal, sdpa)
                for name, f in impls.items():
                    for mode, flops, grad in (("fwd", fwd_flops, None), ("fwd+bwd", 3.5 * fwd_flops, dout)):
                        try:
                            ms, mem = measure(f, (q, k, v, causal), grad)
                            cells = f"{ms:8.3f} | {flops / ms / 1e9:7.1f} | {mem:8.2f}"
                        except torch.cuda.OutOfMemoryError:
                            cells = "     OOM |       - |        -"
                        torch.cuda.empty_cache()
                        err_cell = f"{errs[name, mode]:.2e}" if (name, mode) in errs else ""
                        print(f"| {D:3d} | {'causal' if causal else 'full':6s} | {S:5d} | {B:2d}x{H:2d} | "
                              f"{mode:7s} | {name:24s} | {cells} | {err_cell:8s} |", flush=True)
                del q, k, v, dout


# ----------------------------------------------------------------------------------------
# Row-wise (memory-bound) ops

def rowwise_cases(dtype, tokens, d_model, d_ff, vocab):
    """(name, make inputs, ours, reference, bytes forward, bytes forward+backward)."""
    e = torch.tensor([], dtype=dtype).element_size()
    N = tokens

    def rms_inputs():
        return (torch.randn(N, d_model, device="cuda", dtype=dtype, requires_grad=True),
                torch.ones(d_model, device="cuda", dtype=dtype, requires_grad=True))

    def swiglu_inputs():
        return tuple(torch.randn(N, d_ff, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))

    def ce_inputs():
        return (torch.randn(N // 2, vocab, device="cuda", dtype=dtype, requires_grad=True),
                torch.randint(0, vocab, (N // 2,), device="cuda"))

    return [
        # RMSNorm: x in, y out; backward reads x and dy, writes dx (the weight is negligible).
        ("rms_norm", rms_inputs, lambda x, w: fused.rms_norm(x, w, 1e-5),
         lambda x, w: fused.rms_norm_ref(x, w, 1e-5), 2 * N * d_model * e, 5 * N * d_model * e),
        # SwiGLU: gate and up in, out out; backward reads gate, up, dout and writes two grads.
        ("swiglu", swiglu_inputs, fused.swiglu, fused.swiglu_ref, 3 * N * d_ff * e, 8 * N * d_ff * e),
        # Cross-entropy: the logits read once; backward reads them again and writes their grad.
        ("cross_entropy", ce_inputs, fused.cross_entropy, fused.cross_entropy_ref,
         N // 2 * vocab * e, 3 * N // 2 * vocab * e),
    ]


def rowwise_table(dtype, tokens, d_model, d_ff, vocab, peak_tbps):
    print("| op            | pass    | impl          | ms       | GB/s    | % HBM |\n"
          "|---------------|---------|---------------|----------|---------|-------|", flush=True)
    for name, make, ours, ref, fwd_bytes, fwdbwd_bytes in rowwise_cases(dtype, tokens, d_model, d_ff, vocab):
        inputs = make()
        impls = {"ours": ours, "eager": ref, "torch.compile": torch.compile(ref)}
        dout = torch.randn_like(ours(*inputs))
        for impl, f in impls.items():
            for mode, nbytes, grad in (("fwd", fwd_bytes, None), ("fwd+bwd", fwdbwd_bytes, dout)):
                ms, _ = measure(f, inputs, grad)
                gbps = nbytes / ms / 1e6
                pct = f"{100 * gbps / 1e3 / peak_tbps:5.1f}" if peak_tbps else "    -"
                print(f"| {name:13s} | {mode:7s} | {impl:13s} | {ms:8.3f} | {gbps:7.0f} | {pct} |", flush=True)
        del inputs
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------
# No GPU: correctness only

def smoke():
    """Each kernel once, forward and backward, on tiny shapes under the interpreter."""
    fused.set_backend("triton")
    torch.manual_seed(0)

    def check(name, ours, ref, *inputs):
        xs = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
        rs = [x.clone().double().requires_grad_() if x.is_floating_point() else x for x in inputs]
        out, want = ours(*xs), ref(*rs)
        out.sum().backward()
        want.sum().backward()
        err = max([(out.double() - want).abs().max().item()] +
                  [(x.grad.double() - r.grad).abs().max().item() for x, r in zip(xs, rs) if x.is_floating_point()])
        print(f"  {name:22s} max |ours - reference| = {err:.1e}  {'ok' if err < 1e-4 else 'MISMATCH'}")
        return err < 1e-4

    q, k = torch.randn(1, 4, 33, 64), torch.randn(1, 2, 33, 64)
    t = torch.randint(0, 300, (40,))
    t[::5] = -100
    ok = [check("attention (GQA, causal)", fused.attention, fused.attention_ref, q, k, k.flip(2)),
          check("rms_norm", lambda x, w: fused.rms_norm(x, w, 1e-5), lambda x, w: fused.rms_norm_ref(x, w, 1e-5),
                torch.randn(2, 17, 96), torch.rand(96) + 0.5),
          check("swiglu", fused.swiglu, fused.swiglu_ref, torch.randn(3, 100), torch.randn(3, 100)),
          check("cross_entropy (+z)", lambda x: fused.cross_entropy(x, t, z_loss=1e-3),
                lambda x: fused.cross_entropy_ref(x, t, z_loss=1e-3), torch.randn(40, 300)),
          check("linear_cross_entropy", lambda h, w: fused.linear_cross_entropy(h, w, t, chunk=16),
                lambda h, w: fused.linear_cross_entropy_ref(h, w, t), torch.randn(40, 32), torch.randn(300, 32))]
    return all(ok)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("attention", "rowwise"))
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--seqs", default="512,1024,2048,4096,8192,16384")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch (B * S)")
    p.add_argument("--hidden", type=int, default=2048, help="attention width, H * D")
    p.add_argument("--d-model", type=int, default=4096, help="RMSNorm width")
    p.add_argument("--d-ff", type=int, default=14336, help="SwiGLU width")
    p.add_argument("--vocab", type=int, default=128256, help="cross-entropy vocabulary (Llama 3)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernel_speed.py times kernels on a CUDA GPU and this machine has none.\n"
              "Running the correctness smoke test under TRITON_INTERPRET=1 instead (not a speed):")
        sys.exit(0 if smoke() else 1)

    import triton
    fused.set_backend("triton")
    dtype, name = DTYPES[args.dtype], torch.cuda.get_device_name()
    peak = next((tbps for key, tbps in HBM_TBPS.items() if key in name), None)
    print(f"{datetime.date.today()}, {name}, {args.dtype}, torch {torch.__version__}, triton {triton.__version__}\n")
    if args.only in (None, "attention"):
        seqs = [int(s) for s in args.seqs.split(",")]
        head_dims = [int(d) for d in args.head_dims.split(",")]
        attention_table(seqs, head_dims, dtype, args.tokens, args.hidden)
        print()
    if args.only in (None, "rowwise"):
        rowwise_table(dtype, args.tokens, args.d_model, args.d_ff, args.vocab, peak)
        if peak is None:
            print(f"(no HBM peak on file for {name!r}: add it to HBM_TBPS for the % column)")


if __name__ == "__main__":
    main()
