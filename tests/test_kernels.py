"""Triton kernels against their torch references, forward and input gradients, on odd shapes.

On a CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py). It is slow, so shapes are small, and fused.py picks 16- and 32-wide blocks
under it: a sequence of 130 spans several blocks and ends mid-block, as on a GPU.

Two limits of the interpreter (Triton 3.x) shape the bf16 checks:
- It keeps bf16 values as their raw 16-bit patterns (numpy has no bf16) and hands them to
  np.matmul as integers, so tl.dot on bf16 operands gives garbage. `emulate_bf16_dot` below
  widens bf16 dot operands to fp32 first, which is what a tensor core computes (exact bf16
  products, fp32 accumulation); that lets bf16 attention run here. Other bf16 arithmetic
  stays unsupported, and the kernels do none: they upcast after every load.
- It casts fp32 -> bf16 by truncation (a GPU rounds to nearest even), so bf16 outputs are
  compared within two bf16 ulps (rtol 1.6e-2), not bit for bit.

fp32 results are compared with an fp64 evaluation of the reference, tightly.
"""
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
import fused  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def emulate_bf16_dot():
    """Teach the interpreter bf16 tl.dot (see the module docstring). True when bf16 dots
    can run: on a GPU always; under the interpreter when its builder has the expected shape."""
    if not fused.INTERPRET:
        return True
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
        builder, handle, convert = interpreter.InterpreterBuilder, interpreter.TensorHandle, interpreter._convert_float
    except (ImportError, AttributeError):
        return False
    create_dot = builder.create_dot
    if getattr(create_dot, "widens_bf16", False):
        return True

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        return handle(convert(x.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)

    def dot_widening_bf16(self, a, b, d, *args):
        return create_dot(self, widen(a), widen(b), d, *args)
    dot_widening_bf16.widens_bf16 = True
    builder.create_dot = dot_widening_bf16
    return True


BF16_DOT = emulate_bf16_dot()
f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
TOL = {f32: dict(atol=2e-5, rtol=2e-5), f16: dict(atol=1e-2, rtol=1e-2), bf16: dict(atol=2e-2, rtol=1.6e-2)}


@pytest.fixture(autouse=True)
def triton_backend():
    fused.set_backend("triton")
    yield
    fused.set_backend("auto")


def leaves(*shapes, dtype=f32, scale=1.0):
    return [(torch.randn(s, device=DEVICE) * scale).to(dtype).requires_grad_() for s in shapes]


def as_f64(*xs):
    """fp64 copies of the (already rounded) inputs, for the reference to run on."""
    return [x.detach().double().requires_grad_() for x in xs]


def assert_close(ours, want, dtype, what):
    """Within TOL[dtype], atol taken relative to the largest reference value: a sum over many
    rounded terms (a weight gradient, say) is off by the rounding of its big terms, which can
    exceed a small sum's own size when terms cancel."""
    tol = dict(TOL[dtype], atol=TOL[dtype]["atol"] * max(1.0, want.abs().max().item()))
    torch.testing.assert_close(ours.double(), want.double(), **tol, msg=lambda m: f"{what}: {m}")


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


# ----------------------------------------------------------------------------------------
# Attention

def scaled_scores(q, k, causal, scale):
    """q k^T * scale with K heads repeated for GQA and the future masked: written here,
    independently of fused.py, for the log-sum-exp check."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


ATTN_CASES = [
    # B, Hq, Hkv, Sq,  Sk,   D, causal, dtype
    (1, 2, 2, 1, 1, 64, True, f32),           # one token
    (3, 4, 2, 17, 17, 64, False, f32),        # batch 3, GQA 2
    (3, 4, 4, 17, 17, 128, True, f32),        # head dim 128, no grouping
    (1, 4, 1, 130, 130, 128, True, f32),      # GQA 4; 130 rows = 4 blocks and 2 rows
    (1, 4, 2, 130, 130, 64, False, f32),
    (1, 4, 2, 130, 130, 64, True, f16),
    (3, 2, 1, 17, 17, 128, False, f16),
    (1, 4, 2, 130, 130, 128, True, bf16),     # the training dtype
    (3, 4, 1, 17, 17, 64, False, bf16),
    (1, 4, 2, 17, 130, 64, False, f32),       # a ring-attention block: other queries than keys
    (1, 2, 1, 33, 33, 40, True, f32),         # head dim 40: padded to 64 inside
    (1, 2, 1, 33, 33, 16, True, f32),         # the smallest and largest head dims
    (1, 2, 2, 33, 33, 256, False, bf16),
]


@pytest.mark.parametrize("B, Hq, Hkv, Sq, Sk, D, causal, dtype", ATTN_CASES)
def test_attention_with_lse_matches_reference(B, Hq, Hkv, Sq, Sk, D, causal, dtype):
    check_attention_with_lse(B, Hq, Hkv, Sq, Sk, D, causal, dtype)


def packed_starts(B, S, bounds):
    """doc_starts (B, S) for documents that start at each row's bounds."""
    starts = torch.zeros(B, S, dtype=torch.long, device=DEVICE)
    for b, row in enumerate(bounds):
        for i, a in enumerate(row):
            starts[b, a:row[i + 1] if i + 1 < len(row) else S] = a
    return starts


@pytest.mark.parametrize("dtype", [f32, bf16])
def test_packed_documents_attend_each_alone(dtype):
    """Documents packed in one sequence (doc_starts): the Triton kernels' output and dQ, dK, dV
    equal attention over each document alone, in fp64. Lengths 1, a block and a half of the
    interpreter's 16 keys, and documents crossing block edges; GQA 2."""
    if dtype == bf16 and not BF16_DOT:
        pytest.skip("this interpreter cannot run bf16 tl.dot")
    torch.manual_seed(0)
    B, H, HKV, S, D = 2, 4, 2, 70, 32
    q, k, v = leaves((B, H, S, D), (B, HKV, S, D), (B, HKV, S, D), dtype=dtype)
    bounds = [[0, 1, 2, 26], [0, 17, 33, 50]]
    out = fused.attention(q, k, v, doc_starts=packed_starts(B, S, bounds))
    d_out = torch.randn_like(out)
    got = grads(out, (q, k, v), d_out)
    q64, k64, v64 = as_f64(q, k, v)
    want = torch.zeros(B, H, S, D, dtype=torch.float64)
    for b, row in enumerate(bounds):
        for a, e in zip(row, row[1:] + [S]):
            alone = (t[b:b + 1, :, a:e] for t in (q64, k64, v64))
            want[b:b + 1, :, a:e] = fused.attention_ref(*alone)
    assert_close(out, want, dtype, "out")
    for name, g, w in zip("qkv", got, grads(want, (q64, k64, v64), d_out.double())):
        assert_close(g, w, dtype, f"d{name}")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")   # the interpreter's numpy, in masked-off scores
@pytest.mark.parametrize("causal", [True, False])
def test_attention_survives_a_row_of_very_negative_scores(causal):
    """Scores near -600 make exp(-lse) overflow. Keys past the end of the sequence load as
    zeros and score 0, so unmasked they would give P = inf there and dQ += inf * 0 = NaN:
    the key block cut by the end of the keys must be masked throughout."""
    torch.manual_seed(0)
    q = (3 + 0.1 * torch.randn(1, 2, 70, 64, device=DEVICE)).requires_grad_()
    k = (-3 + 0.1 * torch.randn(1, 1, 70, 64, device=DEVICE)).requires_grad_()
    v = torch.randn(1, 1, 70, 64, device=DEVICE).requires_grad_()
    out = fused.attention(q, k, v, causal=causal, scale=1.0)
    d_out = torch.randn_like(out)
    got = grads(out, (q, k, v), d_out)
    assert all(torch.isfinite(g).all() for g in got)
    # fp32 scores of -600 are exact to ~1e-4 and dQ's sum over keys cancels: compared loosely.
    q64, k64, v64 = as_f64(q, k, v)
    want_out = fused.attention_ref(q64, k64, v64, causal=causal, scale=1.0)
    for name, g, w in zip("qkv", got, grads(want_out, (q64, k64, v64), d_out.double())):
        assert_close(g, w, f16, f"d{name}")


@pytest.mark.parametrize("fwd_and_dq, dkdv", [((16, 32), (32, 16)), ((16, 16), (16, 16)), ((32, 32), (16, 32))])
def test_attention_with_other_block_shapes(monkeypatch, fwd_and_dq, dkdv):
    """The GPU configs include BLOCK_N > BLOCK_M and square tiles; the split between masked
    and unmasked blocks must hold for each. Here the interpreter runs them instead of its own."""
    for kernel, (m, n) in ((fused._attn_fwd, fwd_and_dq), (fused._attn_bwd_dq, fwd_and_dq),
                           (fused._attn_bwd_dkdv, dkdv)):
        monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": m, "BLOCK_N": n})])
    for causal in (True, False):
        check_attention_with_lse(1, 2, 1, 70, 70, 64, causal, f32)


def test_attention_autotunes_once_per_power_of_two_of_the_length(monkeypatch):
    """On a GPU a key the autotuner has not seen times every config; keyed on exact lengths,
    that is each new eval batch and each generated length. 33 and 40 share a bucket, 70 does
    not. The interpreter's single config is never cached, so here there are two, pruned
    (prune_configs_by's early_config_prune) to the first, so that nothing is timed."""
    tuned = (fused._attn_fwd, fused._attn_bwd_dkdv, fused._attn_bwd_dq)
    for kernel in tuned:
        monkeypatch.setattr(kernel, "configs", kernel.configs * 2)
        monkeypatch.setattr(kernel, "early_config_prune", lambda configs, nargs, **kwargs: configs[:1])
        monkeypatch.setattr(kernel, "cache", {})
    entries = []
    for S in (33, 40, 70):
        q, k, v = leaves((1, 2, S, 16), (1, 1, S, 16), (1, 1, S, 16))
        fused.attention(q, k, v).sum().backward()
        entries.append([len(kernel.cache) for kernel in tuned])
    assert entries == [[1, 1, 1], [1, 1, 1], [2, 2, 2]]


def check_attention_with_lse(B, Hq, Hkv, Sq, Sk, D, causal, dtype):
    if dtype == bf16 and not BF16_DOT:
        pytest.skip("this Triton's interpreter cannot be taught bf16 tl.dot")
    torch.manual_seed(0)
    q, k, v = leaves((B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, D), dtype=dtype)
    out, lse = fused.attention_with_lse(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (B, Hq, Sq) and lse.dtype == f32
    # Gradients flow in through both outputs, as in ring attention.
    d_out, d_lse = torch.randn_like(out), torch.randn_like(lse)
    got = grads((out, lse), (q, k, v), (d_out, d_lse))

    q64, k64, v64 = as_f64(q, k, v)
    want_out, want_lse = fused.attention_with_lse_ref(q64, k64, v64, causal=causal)
    want = grads((want_out, want_lse), (q64, k64, v64), (d_out.double(), d_lse.double()))
    scale = D ** -0.5
    torch.testing.assert_close(lse.double(), torch.logsumexp(scaled_scores(q64, k64, causal, scale), -1),
                               atol=1e-5, rtol=1e-5)
    assert_close(out, want_out, dtype, "out")
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, dtype, f"d{name}")


@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_sdpa_with_a_softmax_scale(causal):
    """fused.attention against its reference, torch's scaled_dot_product_attention."""
    torch.manual_seed(0)
    q, k, v = leaves((3, 4, 17, 64), (3, 2, 17, 64), (3, 2, 17, 64))
    out = fused.attention(q, k, v, causal=causal, scale=0.3)
    d_out = torch.randn_like(out)
    got = grads(out, (q, k, v), d_out)
    q64, k64, v64 = as_f64(q, k, v)
    want_out = fused.attention_ref(q64, k64, v64, causal=causal, scale=0.3)
    assert_close(out, want_out, f32, "out")
    for name, g, w in zip("qkv", got, grads(want_out, (q64, k64, v64), d_out.double())):
        assert_close(g, w, f32, f"d{name}")


def test_lse_merges_blocks_like_ring_attention():
    """Ring attention computes a query chunk against one K/V chunk at a time and merges the
    partial results with their log-sum-exp: lse = logaddexp(lse_1, lse_2) and
    out = exp(lse_1 - lse) out_1 + exp(lse_2 - lse) out_2. For the second half of a causal
    sequence that is a non-causal call on the first half's K/V and a causal call on the
    diagonal block; the merge must equal full causal attention, values and gradients
    (which flow back through lse)."""
    torch.manual_seed(0)
    half = 17
    q, k, v = leaves((1, 4, 2 * half, 64), (1, 2, 2 * half, 64), (1, 2, 2 * half, 64))
    q2 = q[:, :, half:]
    o_past, lse_past = fused.attention_with_lse(q2, k[:, :, :half], v[:, :, :half], causal=False)
    o_diag, lse_diag = fused.attention_with_lse(q2, k[:, :, half:], v[:, :, half:], causal=True)
    lse = torch.logaddexp(lse_past, lse_diag)
    out = (lse_past - lse).exp()[..., None] * o_past + (lse_diag - lse).exp()[..., None] * o_diag
    d_out = torch.randn_like(out)
    got = grads(out, (q, k, v), d_out)

    q64, k64, v64 = as_f64(q, k, v)
    want_out = fused.attention_ref(q64, k64, v64, causal=True)[:, :, half:]
    assert_close(out, want_out, f32, "merged out")
    for name, g, w in zip("qkv", got, grads(want_out, (q64, k64, v64), d_out.double())):
        assert_close(g, w, f32, f"merged d{name}")


@pytest.mark.parametrize("block_backward, dtype", [(fused.attention_block_backward, f32),
                                                   (fused.attention_block_backward, bf16),
                                                   (fused.attention_block_backward_ref, f32)])
def test_block_backward_sums_to_the_full_gradient(block_backward, dtype):
    """Ring attention's backward, block by block: given lse and delta = rowsum(dout * out) of
    the whole causal rows, the gradients of the three (query chunk, K/V chunk) blocks, the
    two diagonal ones causal and the off-diagonal one not, add up to full attention's."""
    if dtype == bf16 and not BF16_DOT:
        pytest.skip("this Triton's interpreter cannot be taught bf16 tl.dot")
    torch.manual_seed(0)
    half, D = 17, 64
    q, k, v = leaves((1, 4, 2 * half, D), (1, 2, 2 * half, D), (1, 2, 2 * half, D), dtype=dtype)
    q64, k64, v64 = as_f64(q, k, v)
    out, lse = fused.attention_with_lse_ref(q64, k64, v64, causal=True)
    d_out = torch.randn_like(q)
    delta = (d_out.double() * out).sum(-1)
    dq, dk, dv = (torch.zeros_like(t, dtype=f32) for t in (q, k, v))   # block gradients add up in fp32
    first, second = slice(0, half), slice(half, 2 * half)
    for qs, ks, causal in [(first, first, True), (second, first, False), (second, second, True)]:
        bq, bk, bv = block_backward(q[:, :, qs].detach(), k[:, :, ks].detach(), v[:, :, ks].detach(), d_out[:, :, qs],
                                    lse[:, :, qs].float(), delta[:, :, qs].float(), causal)
        assert bq.dtype == bk.dtype == bv.dtype == f32
        dq[:, :, qs] += bq
        dk[:, :, ks] += bk
        dv[:, :, ks] += bv
    want = grads(out, (q64, k64, v64), d_out.double())
    for name, g, w in zip("qkv", (dq, dk, dv), want):
        assert_close(g, w, dtype, f"d{name}")


def test_attention_rejects_what_it_does_not_do():
    q, k = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 4, 16)
    with pytest.raises(ValueError, match="equal query and key lengths"):
        fused.attention_with_lse(q, k, k, causal=True)
    with pytest.raises(ValueError, match="not a multiple"):
        fused.attention(torch.zeros(1, 3, 8, 16), torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16))


# ----------------------------------------------------------------------------------------
# RMSNorm

@pytest.mark.parametrize("shape, dtype, w_dtype", [
    ((3, 17, 64), f32, f32),
    ((1, 130, 96), f32, f32),       # a width that is not a power of two: a masked block
    ((3, 17, 64), bf16, bf16),
    ((130, 128), bf16, f32),        # bf16 activations, fp32 weight: the output promotes to fp32
    ((2, 9, 200), f16, f16),
])
def test_rms_norm_matches_reference(shape, dtype, w_dtype):
    torch.manual_seed(0)
    x, = leaves(shape, dtype=dtype)
    w = (torch.rand(shape[-1], device=DEVICE) + 0.5).to(w_dtype).requires_grad_()
    y = fused.rms_norm(x, w, 1e-5)
    same_dtype_ref = fused.rms_norm_ref(x, w, 1e-5)   # the reference's own roundings
    assert y.dtype == same_dtype_ref.dtype and y.shape == x.shape
    assert_close(y, same_dtype_ref, dtype, "y")
    dy = torch.randn_like(y)
    x64, w64 = as_f64(x, w)
    want = grads(fused.rms_norm_ref(x64, w64, 1e-5), (x64, w64), dy.double())
    for name, g, wg in zip(("dx", "dw"), grads(y, (x, w), dy), want):
        assert_close(g, wg, dtype, name)


def test_rms_norm_output_follows_x_under_autocast():
    """Under autocast an fp32 weight must not lift bf16 activations to fp32 (QK-norm's q and k
    would then differ from v's dtype); outside it the output promotes, as tested above."""
    x, w = torch.randn(17, 64, device=DEVICE, dtype=bf16), torch.rand(64, device=DEVICE) + 0.5
    with torch.autocast(torch.device(DEVICE).type, dtype=bf16):
        y, want = fused.rms_norm(x, w, 1e-5), fused.rms_norm_ref(x, w, 1e-5)
    assert y.dtype == want.dtype == bf16
    assert_close(y, want, bf16, "y")


# ----------------------------------------------------------------------------------------
# SwiGLU

@pytest.mark.parametrize("shape, dtype", [((3, 17, 100), f32), ((1, 130, 64), bf16), ((2, 1027), f16)])
def test_swiglu_matches_reference(shape, dtype):
    torch.manual_seed(0)
    gate, up = leaves(shape, shape, dtype=dtype, scale=3.0)
    out = fused.swiglu(gate, up)
    assert out.dtype == dtype and out.shape == shape
    assert_close(out, fused.swiglu_ref(gate, up), dtype, "out")
    d_out = torch.randn_like(out)
    g64, u64 = as_f64(gate, up)
    want = grads(fused.swiglu_ref(g64, u64), (g64, u64), d_out.double())
    for name, g, w in zip(("dgate", "dup"), grads(out, (gate, up), d_out), want):
        assert_close(g, w, dtype, name)


# ----------------------------------------------------------------------------------------
# Cross-entropy

def targets_with_ignored(n, vocab, ignore_index, every=4):
    t = torch.randint(0, vocab, (n,), device=DEVICE)
    t[::every] = ignore_index
    return t


@pytest.mark.parametrize("n, vocab, dtype, z_loss, ignore_index", [
    (51, 300, f32, 0.0, -100),      # vocab = 2 blocks and a partial one under the interpreter
    (51, 300, f32, 1e-2, -100),     # with PaLM's z-loss
    (17, 1000, bf16, 1e-3, -1),     # bf16 logits, another ignore index
    (1, 7, f32, 0.0, -100),         # one row, a vocab smaller than a block
])
def test_cross_entropy_matches_reference(n, vocab, dtype, z_loss, ignore_index):
    torch.manual_seed(0)
    logits, = leaves((n, vocab), dtype=dtype, scale=3.0)
    targets = targets_with_ignored(n, vocab, ignore_index) if n > 1 else torch.tensor([3], device=DEVICE)
    before = logits.detach().clone()
    loss = fused.cross_entropy(logits, targets, ignore_index=ignore_index, z_loss=z_loss)
    d_logits, = grads(loss, (logits,), torch.tensor(2.0, device=DEVICE))   # a scaled loss, like grad accumulation
    assert torch.equal(logits.detach(), before), "the caller's logits must not be overwritten"
    l64, = as_f64(logits)
    want = fused.cross_entropy_ref(l64, targets, ignore_index=ignore_index, z_loss=z_loss)
    torch.testing.assert_close(loss.double(), want.double(), atol=1e-5, rtol=1e-5)   # fp32 math in both
    want_grad, = grads(want, (l64,), torch.tensor(2.0, dtype=torch.float64, device=DEVICE))
    assert_close(d_logits, want_grad, dtype, "dlogits")


@pytest.mark.parametrize("n, d, vocab, chunk, dtype, z_loss", [
    (51, 32, 300, 16, f32, 1e-2),   # 4 chunks, the last one partial
    (51, 32, 300, None, f32, 0.0),  # the default chunk size
    (17, 64, 500, 8, bf16, 0.0),
])
def test_linear_cross_entropy_matches_reference(n, d, vocab, chunk, dtype, z_loss):
    torch.manual_seed(0)
    h, w = leaves((n, d), (vocab, d), dtype=dtype)
    with torch.no_grad():
        w /= d ** 0.5
    targets = targets_with_ignored(n, vocab, -100)
    loss = fused.linear_cross_entropy(h, w, targets, z_loss=z_loss, chunk=chunk)
    got = grads(loss, (h, w), torch.tensor(0.5, device=DEVICE))
    h64, w64 = as_f64(h, w)
    want = fused.linear_cross_entropy_ref(h64, w64, targets, z_loss=z_loss)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == f32 else dict(atol=2e-2, rtol=2e-2)   # bf16 logits
    torch.testing.assert_close(loss.double(), want.double(), **tol)
    want_grads = grads(want, (h64, w64), torch.tensor(0.5, dtype=torch.float64, device=DEVICE))
    for name, g, wg in zip(("dh", "dw"), got, want_grads):
        assert g.dtype == dtype
        assert_close(g, wg, dtype, name)
    with torch.no_grad():   # no gradient wanted: the loss alone, same value
        torch.testing.assert_close(fused.linear_cross_entropy(h, w, targets, z_loss=z_loss, chunk=chunk), loss)


def test_linear_cross_entropy_takes_no_gradient_under_no_grad(monkeypatch):
    """Validation and eval call the fused head under no_grad on parameters that require grad:
    no dh, no dW (a (V, d) fp32 buffer) and no gradient GEMMs then, and the same loss."""
    torch.manual_seed(0)
    h, w = leaves((51, 32), (300, 32))
    targets = targets_with_ignored(51, 300, -100)
    calls, ce_grad = [], fused._ce_grad
    monkeypatch.setattr(fused, "_ce_grad", lambda *a, **k: calls.append(1) or ce_grad(*a, **k))
    with torch.no_grad():
        loss = fused.linear_cross_entropy(h, w, targets, chunk=16)
    assert not calls, "gradient work under no_grad"
    want = fused.linear_cross_entropy(h, w, targets, chunk=16)
    assert len(calls) == 4                 # one per chunk when a gradient is wanted: the counter counts
    torch.testing.assert_close(loss, want.detach(), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------
# GPU code, compiled without a GPU

def test_every_kernel_compiles_for_h100_and_a100():
    """The interpreter runs a kernel's Python, not its GPU code: ptxas must accept each one
    too. bench/compile_kernels.py compiles every launch fused.py makes for sm_90 and sm_80
    (the first autotune config of each; the script without flags does them all)."""
    pytest.importorskip("triton.backends.nvidia")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the other tests compile and run the kernels themselves")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "compile_kernels.py")
    run = subprocess.run([sys.executable, script, "--arch", "90,80", "--dtype", "bf16", "--first-config"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_rms_norm_bwd", "_swiglu_bwd", "_ce_bwd",
                 "_quant_linear", "_grouped_mm", "_grouped_mm_dw", "_selective_scan_fwd", "_selective_scan_bwd"):
        assert f"| sm_90 | bf16 | {name} |" in run.stdout and f"| sm_80 | bf16 | {name} |" in run.stdout


# ----------------------------------------------------------------------------------------
# Dispatch, and a model trained both ways

def test_backend_switch_picks_the_path():
    x = torch.zeros(2, device="cpu")
    with pytest.raises(ValueError, match="choose one of"):
        fused.set_backend("cuda")
    fused.set_backend("torch")
    assert not fused.use_triton(x)
    fused.set_backend("auto")
    assert not fused.use_triton(x)        # auto: the reference for CPU tensors
    fused.set_backend("triton")
    if fused.INTERPRET:
        assert fused.use_triton(x)
    else:                                   # a GPU machine: CPU tensors cannot take the Triton path
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            fused.use_triton(x)
        assert fused.use_triton(x.cuda())


@pytest.mark.skipif(not BF16_DOT, reason="this Triton's interpreter cannot be taught bf16 tl.dot")
@pytest.mark.parametrize("qk_norm", [False, True])
def test_bf16_autocast_model_gradients_are_as_close_to_fp32_as_the_references(qk_norm):
    """The training path on a GPU: bf16 autocast around the model, so the kernels see bf16
    q/k/v and SwiGLU inputs, fp32 residuals into RMSNorm, and the fused LM head runs its
    chunks' matmuls under autocast. Loss and every gradient are compared with the fp32
    run; the Triton path may be off by bf16 rounding, as the reference path is, but not by
    more than 2.5x as much (the interpreter truncates fp32 -> bf16 where a GPU rounds to
    nearest, which alone about doubles the error). QK-norm puts bf16 q and k through
    RMSNorm's fp32 weight, and attention still needs them in v's dtype."""
    cfg = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      qk_norm=qk_norm)
    torch.manual_seed(0)
    x = torch.randint(0, 128, (2, 33), device=DEVICE)
    y = torch.roll(x, -1, 1)
    y[0, :5] = -100
    runs = {}
    for name, backend, bf16_autocast in (("fp32", "torch", False), ("reference", "torch", True),
                                         ("triton", "triton", True)):
        fused.set_backend(backend)
        torch.manual_seed(0)
        model = Transformer(cfg).to(DEVICE)
        with torch.autocast(torch.device(DEVICE).type, dtype=bf16, enabled=bf16_autocast):
            loss = model(x, y)
        loss.backward()
        runs[name] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    exact_loss, exact = runs["fp32"]
    assert abs(runs["triton"][0] - exact_loss) < 1e-3
    for n, g in exact.items():
        ref_err = ((runs["reference"][1][n] - g).norm() / g.norm()).item()
        err = ((runs["triton"][1][n] - g).norm() / g.norm()).item()
        assert err < 2.5 * ref_err + 1e-3, f"{n}: relative error {err:.4f}, the references' {ref_err:.4f}"


# torch.compile must see the kernels as Triton kernels inside one graph: a graph break (a
# host sync such as .item(), an autotune argument dynamo refuses) costs speed on a GPU
# without failing anything. Dynamo only looks for Triton kernels when a GPU is present and
# the interpreter is off, so on a CPU a fresh process traces the model with both switches
# forced; a backend that keeps the graph stops before anything runs.
CAPTURE_MODEL_GRAPH = """
import torch, torch.utils._triton
import fused, model
torch.utils._triton.has_triton = lambda: True
fused.use_triton = lambda x: True
class Captured(Exception):
    pass
graphs = []
def keep_graph(gm, example_inputs):
    graphs.append(gm)
    def run(*args):
        raise Captured
    return run
cfg = model.ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
x = torch.randint(0, 128, (2, 33))
try:
    torch.compile(model.Transformer(cfg), backend=keep_graph, fullgraph=True)(x, x)
except Captured:
    pass
for name, body in graphs[0].named_children():
    print(name, "triton_kernel_wrapper_mutation" in str(body.code))
"""


def test_model_compiles_to_one_graph_with_the_triton_kernels():
    """fullgraph=True fails on any graph break; every op's forward body must hold a Triton
    kernel call (not the reference, not an inlined interpreter), and so must every backward
    but the fused LM head's, whose gradients the forward already computed."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU test_compiled_model_matches_eager compiles for real")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", CAPTURE_MODEL_GRAPH], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    bodies = dict(line.split() for line in run.stdout.splitlines())
    # 2 layers x (2 RMSNorms, attention, SwiGLU) + final RMSNorm + fused LM head and loss
    assert sorted(bodies) == sorted(f"{kind}_body_{i}" for kind in ("fwd", "bwd") for i in range(10))
    assert all(bodies[f"fwd_body_{i}"] == "True" for i in range(10)), bodies
    assert sum(bodies[f"bwd_body_{i}"] == "True" for i in range(10)) == 9, bodies


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor compiles Triton kernels for a GPU")
def test_compiled_model_matches_eager():
    """torch.compile (inductor) around the Triton kernels gives eager's loss and gradients."""
    cfg = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg).to(DEVICE)
    x = torch.randint(0, 128, (2, 33), device=DEVICE)
    results = []
    for fn in (model, torch.compile(model, fullgraph=True)):
        model.zero_grad()
        loss = fn(x, torch.roll(x, -1, 1))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=1e-4)


def test_tiny_model_trains_to_the_same_loss_with_kernels_on_and_off(monkeypatch):
    """Six AdamW steps of a 2-layer GQA model, once on the references and once on the
    Triton kernels (fused linear cross-entropy included): the same losses step by step."""
    cfg = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    torch.manual_seed(0)
    x = torch.randint(0, 128, (2, 33), device=DEVICE)   # 33 positions: blocks end mid-way
    y = torch.roll(x, -1, 1)
    y[0, :5] = -100
    losses = {}
    for backend in ("torch", "triton"):
        fused.set_backend(backend)
        if backend == "triton":   # prove the kernels ran: the references now refuse to
            for name in ("attention_ref", "rms_norm_ref", "swiglu_ref", "cross_entropy_ref"):
                monkeypatch.setattr(fused, name, lambda *a, **k: pytest.fail("reference used on the triton path"))
        torch.manual_seed(0)
        model = Transformer(cfg).to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[backend] = []
        for _ in range(6):
            loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[backend].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["torch"]), atol=1e-4, rtol=1e-4)
    assert losses["triton"][-1] < losses["triton"][0] - 0.5


def test_packed_documents_through_the_model_on_the_triton_path():
    """The model's doc_starts path on the kernels: logits and their gradient per document alone."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2)).to(DEVICE)
    docs = [torch.randint(1, 64, (n,), device=DEVICE) for n in (3, 20, 1, 12)]
    for d in docs:
        d[0] = 0
    packed = torch.cat(docs)[None]
    import model as model_py
    got = m(packed, doc_starts=model_py.document_starts(packed, 0))
    fused.set_backend("torch")
    want = torch.cat([m(d[None]) for d in docs], 1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------------------
# Weight-only quantized linears: decode-sized inputs (a few rows) against the references in
# fp64. Under the interpreter the blocks are 16 features x 32 inputs, so 70 outputs and
# 113 or 130 inputs end mid-block.

def int8_weights(n_out, n_in, dtype=f32):
    q = torch.randint(-128, 128, (n_out, n_in), dtype=torch.int8, device=DEVICE)
    return q, (torch.rand(n_out, device=DEVICE) * 0.02 + 0.01).to(dtype)


def int4_weights(n_out, n_in, group, dtype=f32):
    q = torch.randint(0, 256, (n_out, n_in // 2), dtype=torch.uint8, device=DEVICE)
    s = (torch.rand(n_out, n_in // group, device=DEVICE) * 0.1 + 0.05).to(dtype)
    z = (torch.rand(n_out, n_in // group, device=DEVICE) * 15).to(dtype)
    return q, s, z


def check_int8_linear(rows, n_in, n_out, dtype, s_dtype=f32):
    x = torch.randn(*rows, n_in, device=DEVICE).to(dtype)
    q, s = int8_weights(n_out, n_in, s_dtype)
    y = fused.int8_linear(x, q, s)
    assert y.dtype == dtype and y.shape == (*rows, n_out)
    assert_close(y, fused.int8_linear_ref(x.double(), q, s.double()), dtype, "int8 y")


def check_int4_linear(rows, n_in, n_out, group, dtype, s_dtype=f32):
    x = torch.randn(*rows, n_in, device=DEVICE).to(dtype)
    q, s, z = int4_weights(n_out, n_in, group, s_dtype)
    y = fused.int4_linear(x, q, s, z, group)
    assert y.dtype == dtype and y.shape == (*rows, n_out)
    assert_close(y, fused.int4_linear_ref(x.double(), q, s.double(), z.double(), group), dtype, "int4 y")


@pytest.mark.parametrize("rows, n_in, dtype, s_dtype", [
    ((1,), 96, f32, f32),       # one decode token
    ((3,), 130, f32, f32),      # 4 input blocks and 2 columns
    ((16,), 113, f32, f32),     # a full tile of rows
    ((2, 3), 130, f32, f32),    # a leading batch dim
    ((3,), 130, bf16, f32),
    ((16,), 96, bf16, bf16),    # scales in x's dtype
    ((1,), 130, f16, f16),
])
def test_int8_linear_matches_reference(rows, n_in, dtype, s_dtype):
    if dtype == bf16 and not BF16_DOT:
        pytest.skip("this Triton's interpreter cannot be taught bf16 tl.dot")
    torch.manual_seed(0)
    check_int8_linear(rows, n_in, 70, dtype, s_dtype)


@pytest.mark.parametrize("rows, n_in, group, dtype, s_dtype", [
    ((1,), 96, 32, f32, f32),
    ((3,), 128, 64, f32, f32),
    ((16,), 192, 64, f32, f32),
    ((2, 3), 96, 32, f32, f32),
    ((3,), 128, 32, bf16, f32),
    ((16,), 128, 64, bf16, bf16),
    ((1,), 96, 32, f16, f16),
])
def test_int4_linear_matches_reference(rows, n_in, group, dtype, s_dtype):
    if dtype == bf16 and not BF16_DOT:
        pytest.skip("this Triton's interpreter cannot be taught bf16 tl.dot")
    torch.manual_seed(0)
    check_int4_linear(rows, n_in, 70, group, dtype, s_dtype)


@pytest.mark.parametrize("block_n, block_k", [(32, 64), (64, 128)])
def test_quantized_linears_with_other_block_shapes(monkeypatch, block_n, block_k):
    """The GPU configs' input steps are longer than a group of 32 (int4 then steps one group at
    a time) or shorter than one of 128 (two steps per group); 20 rows take two row blocks."""
    config = triton.Config({"BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": block_k})
    monkeypatch.setattr(fused._quant_linear, "configs", [config])
    torch.manual_seed(0)
    check_int8_linear((20,), 130, 70, f32)
    for group in (32, 64, 128):
        check_int4_linear((3,), 256, 70, group, f32)


def test_int4_packing_is_low_nibble_first():
    """Byte j of a row holds input column 2j in its low nibble and 2j + 1 in its high one, and
    W[o, i] = (q[o, i] - zeros[o, i // g]) * scales[o, i // g]: W built by hand from q."""
    torch.manual_seed(0)
    n_out, n_in, group = 6, 64, 32
    q = torch.randint(0, 16, (n_out, n_in), dtype=torch.uint8)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    s = torch.rand(n_out, n_in // group, dtype=torch.float64) + 0.5
    z = torch.rand(n_out, n_in // group, dtype=torch.float64) * 15
    g = torch.arange(n_in) // group
    w = (q.double() - z[:, g]) * s[:, g]
    x = torch.randn(3, n_in, dtype=torch.float64)
    assert torch.equal(fused.unpack_int4(packed), q)
    torch.testing.assert_close(fused.int4_linear_ref(x, packed, s, z, group), x @ w.T)
    assert_close(fused.int4_linear(x.float(), packed, s.float(), z.float(), group), x @ w.T, f32, "triton")


def test_quantized_linears_refuse_what_they_do_not_do():
    x = torch.randn(2, 64)
    q8, s8 = int8_weights(8, 64)
    q4, s4, z4 = int4_weights(8, 64, 32)
    with pytest.raises(ValueError, match="a multiple of it"):
        fused.int4_linear(torch.randn(2, 48), q4[:, :24], s4, z4, 32)
    with pytest.raises(ValueError, match="power of two from 32"):
        fused.int4_linear(x, q4, s4, z4, 16)
    with pytest.raises(ValueError, match="scales"):
        fused.int4_linear(x, q4, s4, z4[:, :1], 32)
    with pytest.raises(ValueError, match="qweight"):
        fused.int8_linear(x, q4, s8)
    with pytest.raises(RuntimeError, match="inference only"):
        fused.int8_linear(x.requires_grad_(), q8, s8)
    with torch.no_grad():
        assert fused.int8_linear(x, q8, s8).shape == (2, 8)


# ----------------------------------------------------------------------------------------
# Grouped matmul (dropless MoE). Under the interpreter the tiles are 16 rows x 16 outputs over
# 16-wide steps: a group of 37 rows takes three row tiles and ends mid-tile, one of 16 exactly
# one, and K = 20 or 33, N = 24 end mid-block.

def per_row_grouped_matmul(x, w, counts):
    """x[i] @ w[group of i].T row by row, the group found by searching the groups' row ends."""
    group_of = torch.searchsorted(counts.cumsum(0), torch.arange(len(x), device=x.device), right=True)
    return torch.stack([x[i] @ w[group_of[i]].T for i in range(len(x))])


def nan_padded(t, pad=16):
    """t as a view into a wider buffer whose extra columns are NaN: a kernel that reads past t's
    last column (a dropped mask) puts NaN in its output."""
    buf = torch.full((*t.shape[:-1], t.shape[-1] + pad), float("nan"), dtype=t.dtype, device=t.device)
    buf[..., :t.shape[-1]] = t
    return buf[..., :t.shape[-1]]


GMM_CASES = [
    # counts,              K,  N,  dtype, w stored as (G, K, N)
    ([0, 37, 0, 5, 1, 0], 20, 24, f32, False),   # empty first, middle and last groups; one row alone
    ([16, 3, 20], 33, 24, f32, False),           # a group of exactly one tile
    ([0, 37, 0, 5, 1, 0], 20, 24, f32, True),    # w a transposed view: other strides
    ([0, 37, 0, 5, 1, 0], 20, 24, bf16, False),
    ([16, 3, 20], 33, 24, bf16, True),
]


@pytest.mark.parametrize("counts", [[0, 37, 0, 5, 1, 0], [16, 3, 20]])
def test_grouped_matmul_reference_is_a_per_row_loop(counts):
    torch.manual_seed(0)
    counts = torch.tensor(counts, device=DEVICE)
    x, w = torch.randn(int(counts.sum()), 20, device=DEVICE), torch.randn(len(counts), 24, 20, device=DEVICE)
    torch.testing.assert_close(fused.grouped_matmul_ref(x, w, counts), per_row_grouped_matmul(x, w, counts))


@pytest.mark.parametrize("counts, K, N, dtype, w_transposed", GMM_CASES)
def test_grouped_matmul_matches_reference(counts, K, N, dtype, w_transposed):
    if dtype == bf16 and not BF16_DOT:
        pytest.skip("this Triton's interpreter cannot be taught bf16 tl.dot")
    torch.manual_seed(0)
    counts = torch.tensor(counts, device=DEVICE)
    x, w = leaves((int(counts.sum()), K), (len(counts), K, N) if w_transposed else (len(counts), N, K), dtype=dtype)
    w_used = w.transpose(1, 2) if w_transposed else w
    y = fused.grouped_matmul(nan_padded(x), nan_padded(w_used), counts)
    assert y.dtype == dtype and y.shape == (x.shape[0], N)
    dy = torch.randn_like(y)
    dx, dw = grads(y, (x, w), nan_padded(dy))
    x64, w64 = as_f64(x, w)
    want = fused.grouped_matmul_ref(x64, w64.transpose(1, 2) if w_transposed else w64, counts)
    for ours, ref, what in zip((y, dx, dw), (want, *grads(want, (x64, w64), dy.double())), ("y", "dx", "dw")):
        assert_close(ours, ref, dtype, what)
    assert (dw[counts == 0] == 0).all()              # written as zeros, not left as empty_like's memory


def test_grouped_matmul_with_no_rows():
    x, w = leaves((0, 20), (3, 24, 20))
    y = fused.grouped_matmul(x, w, torch.zeros(3, dtype=torch.long, device=DEVICE))
    dx, dw = grads(y, (x, w), torch.ones_like(y))
    assert y.shape == (0, 24) and dx.shape == (0, 20) and torch.equal(dw, torch.zeros_like(w))


def test_grouped_matmul_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="want x"):
        fused.grouped_matmul(torch.randn(4, 20), torch.randn(2, 24, 16), torch.tensor([2, 2]))


# ----------------------------------------------------------------------------------------
# Selective scan (Mamba). Under the interpreter a tile is 8 steps x 4 channels: 17 steps take
# three chunks, the last of one step, 64 steps eight, and 6 channels two blocks, the second half
# empty. The interpreter runs tl.associative_scan one element at a time, so shapes stay small.

def scan_inputs(batch, L, d, N, dtype=f32):
    """Leaves as the Mamba block makes them: dt = softplus(.) > 0, and A = -exp(.) < 0 and D in fp32."""
    x, B, C = (torch.randn(s, device=DEVICE).to(dtype) for s in ((batch, L, d), (batch, L, N), (batch, L, N)))
    dt = torch.nn.functional.softplus(torch.randn(batch, L, d, device=DEVICE) - 1).to(dtype)
    A, D = -torch.exp(0.5 * torch.randn(d, N, device=DEVICE)), torch.randn(d, device=DEVICE)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D)]


def scan_closed_form(x, dt, A, B, C, D):
    """y and h_L of the discretised system materialised, with no recurrence: h_t = sum over s <= t of
    exp(A (dt_{s+1} + ... + dt_t)) dt_s B_s x_s (the product of the steps' exp(dt A) is the exponential
    of a sum), y_t = C_t . h_t + D x_t. It holds (batch, L, L, d, N): small L only."""
    L = x.shape[1]
    S = dt.cumsum(1)                                                               # (b, L, d)
    gap = (S[:, :, None] - S[:, None, :]).clamp(min=0)                             # (b, t, s, d): S_t - S_s
    decay = torch.exp(gap[..., None] * A) * torch.ones(L, L, dtype=x.dtype, device=x.device).tril()[..., None, None]
    h = torch.einsum("btsdn,bsd,bsn->btdn", decay, dt * x, B)                      # every h_t
    return torch.einsum("btdn,btn->btd", h, C) + x * D, h[:, -1]


@pytest.mark.parametrize("L", [1, 6])
def test_selective_scan_reference_is_the_closed_form(L):
    torch.manual_seed(0)
    ins = [t.detach().double() for t in scan_inputs(2, L, 3, 4)]
    y, last = fused.selective_scan_ref(*ins, return_last_state=True)
    want_y, want_last = scan_closed_form(*ins)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(last, want_last)
    y, last = fused.selective_scan_ref(*(t.float() for t in ins), return_last_state=True)
    assert y.dtype == last.dtype == f32
    y, last = fused.selective_scan_ref(*(t.to(bf16) if t.ndim == 3 else t.float() for t in ins), return_last_state=True)
    assert y.dtype == bf16 and last.dtype == f32          # the state stays fp32 for bf16 inputs


def check_selective_scan(batch, L, d, N, dtype):
    """y, h_L and the six gradients against the reference in fp64. x, B, C and dy come as views into
    NaN-padded buffers, as x and B, C are slices of the block's in_proj and x_proj outputs. h_L and
    dA, dD are fp32 whatever the inputs: compared at fp32's tolerance."""
    ins = scan_inputs(batch, L, d, N, dtype)
    x, dt, A, B, C, D = ins
    y, last = fused.selective_scan(nan_padded(x), dt, A, nan_padded(B), nan_padded(C), D, return_last_state=True)
    assert y.dtype == dtype and y.shape == x.shape and last.shape == (batch, d, N) and last.dtype == f32
    assert not last.requires_grad
    dy = torch.randn_like(y)
    got = grads(y, ins, nan_padded(dy))
    ins64 = as_f64(*ins)
    want_y, want_last = fused.selective_scan_ref(*ins64, return_last_state=True)
    assert_close(y, want_y, dtype, "y")
    assert_close(last, want_last, f32, "last state")
    for name, g, w, t in zip(("x", "dt", "A", "B", "C", "D"), got, grads(want_y, ins64, dy.double()), ins):
        assert g.dtype == t.dtype
        assert_close(g, w, dtype if t.ndim == 3 else f32, f"d{name}")


@pytest.mark.parametrize("batch, L, N, dtype", [
    (2, 1, 4, f32),      # one step: one chunk, 7 of its 8 steps masked
    (1, 17, 16, f32),    # two chunks and one step
    (2, 64, 4, f32),     # eight full chunks
    (1, 17, 5, f32),     # 5 states in a tile of 8: masked
    (1, 1, 16, bf16),
    (2, 17, 4, bf16),
    (1, 64, 4, bf16),
])
def test_selective_scan_matches_reference(batch, L, N, dtype):
    torch.manual_seed(0)
    check_selective_scan(batch, L, 6, N, dtype)


@pytest.mark.parametrize("blocks", [(16, 8), (1, 2)])
def test_selective_scan_with_other_tiles(monkeypatch, blocks):
    """A GPU-sized chunk of 16 steps (17 = one chunk and one step), and chunks of one step, where
    every step's carry crosses chunks."""
    monkeypatch.setattr(fused, "_scan_blocks", lambda n: blocks)
    torch.manual_seed(0)
    check_selective_scan(1, 17, 6, 4, f32)


def test_selective_scan_rejects_mismatched_shapes():
    x, dt, A, B, C, D = scan_inputs(1, 5, 6, 4)
    with pytest.raises(ValueError, match="want x and dt"):
        fused.selective_scan(x, dt, A.T, B, C, D)
