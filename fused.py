"""fused.py — the fused ops the model calls, each with a torch reference.

Every op has a torch reference (the source of truth for tests), Triton kernels, an
autograd.Function that launches them, and a dispatcher that model.py calls:

    attention(q, k, v, causal, scale)           flash attention, FlashAttention-2 forward and backward
    attention_with_lse(q, k, v, causal, scale)  the same, plus the per-row log-sum-exp (ring attention)
    attention_block_backward(...)               one K/V block's gradients given the rows' lse (ring)
    rms_norm(x, weight, eps)                    RMSNorm, one read of x per pass, fp32 statistics
    swiglu(gate, up)                            silu(gate) * up, recomputed in backward
    cross_entropy(logits, targets, ...)         mean loss, no fp32 copy of the logits
    linear_cross_entropy(h, weight, targets)    LM head + loss in row chunks (Liger's FLCE)
    int8_linear(x, qweight, scales)             weight-only int8 / int4 linears for decoding, dequantized
    int4_linear(x, qweight, scales, zeros, g)   in registers (inference only: no autograd.Function)
    grouped_matmul(x, w, counts)                each group of rows times its own weight: dropless MoE experts
    selective_scan(x, dt, A, B, C, D)           Mamba's S6 recurrence, a chunked parallel scan over time

The dispatcher picks:

    backend "auto"   Triton for CUDA tensors, the torch reference otherwise
    backend "torch"  always the reference (`[train] kernels = "torch"` in a config)
    backend "triton" always Triton; on a CPU it needs TRITON_INTERPRET=1 set before importing triton (conftest.py does)

fused.py knows nothing about models: shapes in, shapes out.
"""
import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # macOS, or a CPU-only install without triton: the references only.
    HAVE_TRITON = False
    from types import SimpleNamespace
    # Just enough for the kernel definitions below to be parsed; set_backend refuses "triton".
    triton = SimpleNamespace(jit=lambda fn: fn, autotune=lambda *a, **k: (lambda fn: fn), Config=lambda *a, **k: None)
    tl = SimpleNamespace(constexpr=None)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ("auto", "torch", "triton")
_backend = "auto"


def set_backend(name):
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernels backend {name!r}: choose one of {BACKENDS}")
    if name == "triton" and not HAVE_TRITON:
        raise RuntimeError("kernels backend 'triton' needs the triton package (pip install triton)")
    _backend = name


def use_triton(x):
    """Whether the op on tensor x runs the Triton path."""
    if _backend == "torch" or not HAVE_TRITON:
        return False
    if _backend == "triton":
        if not (x.is_cuda or INTERPRET):
            raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1 set before importing triton")
        return True
    return x.is_cuda


def _autotune(gpu_configs, interpreter_config, key):
    """triton.autotune over a short list of block sizes on a GPU. Under the interpreter one small config: the
    interpreter is slow, and small blocks exercise the boundary masks. Attention keys on SQ_POW2 and SK_POW2, the
    lengths rounded up to powers of two (arguments the kernels never read): keyed on exact lengths, each new one
    (an eval batch, a generated length) would time every config again."""
    return triton.autotune([interpreter_config] if INTERPRET else gpu_configs, key=key)


def _dot_precision(x):
    """fp32 inputs follow torch's own matmul switch (TF32 or exact); 16-bit ones are exact anyway."""
    return "tf32" if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _rows(x):
    """x as (rows, last dim) with unit stride along the last dim; a view when it can be."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


# ----------------------------------------------------------------------------------------
# Attention: FlashAttention-2 (Dao 2023). Never forms the (S, S) score matrix: a program keeps a tile of queries on
# chip and streams K/V tiles past it with an online softmax (Milakov & Gimelshein 2018), then rescales once at the end
# (FA2 section 3.1.1). Grouped-query attention reads K/V head h // group for query head h: the indexing that
# repeat_interleave would give, without materialising the repeated K/V.

def doc_mask(doc_starts, n):
    """(B, 1, S, S) True where query i may see key j: causal, and not before the start of i's
    document (doc_starts (B, S)): the block-diagonal mask of packed documents."""
    i, j = torch.arange(n, device=doc_starts.device)[:, None], torch.arange(n, device=doc_starts.device)
    return ((j <= i) & (j >= doc_starts[:, :, None]))[:, None]


def attention_ref(q, k, v, causal=True, scale=None, doc_starts=None):
    """q (B, Hq, S, D), k and v (B, Hkv, S, D) with Hq a multiple of Hkv -> (B, Hq, S, D)."""
    mask = doc_mask(doc_starts, q.shape[2]) if doc_starts is not None else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def attention_with_lse_ref(q, k, v, causal=True, scale=None, doc_starts=None):
    """Attention written out, and lse = logsumexp over keys of the scaled (masked) scores,
    (B, Hq, Sq) in fp32, natural log. Computed in fp32 (fp64 when given fp64)."""
    group = q.shape[1] // k.shape[1]
    dt = torch.promote_types(q.dtype, torch.float32)
    k, v = k.repeat_interleave(group, 1).to(dt), v.repeat_interleave(group, 1).to(dt)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q.to(dt) @ k.transpose(-1, -2) * scale                                   # (B, Hq, Sq, Sk)
    if doc_starts is not None:
        s = s.masked_fill(~doc_mask(doc_starts, s.shape[-1]), float("-inf"))
    elif causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                             # (B, Hq, Sq)
    return (torch.exp(s - lse[..., None]) @ v).to(q.dtype), lse


def _fwd_configs():
    # H100/A100 block sizes (BLOCK_M query rows, BLOCK_N keys per step, warps, pipeline stages), near the Triton
    # fused-attention tutorial's. Compiled for sm_90 in bf16 (bench/compile_kernels.py), none spills at head dims 64
    # and 128 and all but the last run their dots as wgmma; the autotuner times them on the GPU at hand and skips any
    # that overflow its shared memory. 128 x 32 is the one wgmma config that fits at head dim 256; the last, small
    # one is for fp32 inputs (tests, debugging), where the others overflow shared memory at head dim 128.
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in
            [(128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 4, 4), (128, 32, 8, 2), (32, 32, 4, 1)]]


@triton.jit
def _load_kv_block(K, V, cols, sk_s, sv_s, SK, HEAD_DIM: tl.constexpr, MASK: tl.constexpr):
    """The keys and values at positions cols; MASK: the block may pass the end of the keys."""
    offs_d = tl.arange(0, HEAD_DIM)
    if MASK:
        k = tl.load(K + cols[:, None] * sk_s + offs_d[None, :], mask=cols[:, None] < SK, other=0.0)
        v = tl.load(V + cols[:, None] * sv_s + offs_d[None, :], mask=cols[:, None] < SK, other=0.0)
    else:
        k = tl.load(K + cols[:, None] * sk_s + offs_d[None, :])
        v = tl.load(V + cols[:, None] * sv_s + offs_d[None, :])
    return k, v


@triton.jit
def _key_blocks(start_m, SK, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(unmasked, hi): the key blocks query rows start_m.. visit are [0, hi), and those before
    `unmasked` lie wholly inside the keys and (causal) wholly left of the first row, so need
    no mask. Causal block skipping: blocks wholly above the diagonal are past hi."""
    unmasked, hi = (SK // BLOCK_N) * BLOCK_N, SK
    if CAUSAL:
        unmasked = tl.minimum(unmasked, (start_m // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(SK, start_m + BLOCK_M)
    return unmasked, hi


@triton.jit
def _attn_fwd_blocks(acc, l_i, m_i, q, K, V, rows, starts, lo, hi, sk_s, sv_s, SK, qk_scale,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr, MASK: tl.constexpr, DOC: tl.constexpr):
    """The online softmax over key blocks lo, lo + BLOCK_N, ... < hi. MASK: the blocks on the
    causal diagonal or at the end of the keys, which need masking; the others (most of them
    at long sequences) skip its compares and selects (the Triton tutorial's two stages)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k, v = _load_kv_block(K, V, cols, sk_s, sv_s, SK, HEAD_DIM, MASK)
        # qk_scale = scale * log2(e): scores in base 2 so the exponential is one exp2
        # (the native MUFU instruction); FA2 and the Triton tutorial do the same.
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale   # (BLOCK_M, BLOCK_N)
        if MASK:
            keep = cols[None, :] < SK
            if CAUSAL:
                keep &= cols[None, :] <= rows[:, None]
            if DOC:  # not before the start of the row's document
                keep &= cols[None, :] >= starts[:, None]
            s = tl.where(keep, s, float("-inf"))
        # Online softmax. Without documents every row sees a key in its first block (column 0, or in the masked stage
        # its own diagonal), so m_new is finite and alpha = exp2(-inf) = 0, never NaN; a row whose document starts after
        # this block sees none yet: its max stays -inf, and 0 replaces it in the subtraction (p and alpha are then 0).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new) if DOC else m_new
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_autotune(_fwd_configs(), triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}),
           key=["SQ_POW2", "SK_POW2", "HEAD_DIM", "CAUSAL", "DOC"])
@triton.jit
def _attn_fwd(Q, K, V, OUT, LSE, DOCS,
              sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,
              H, GROUP, SQ, SK, SQ_POW2, SK_POW2, qk_scale,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, DOC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head); loops over key blocks. DOC: packed
    documents, DOCS (B, 2, S) int32 the start and end of each position's one (_doc_bounds)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)                  # int64: b * stride can pass 2^31
    b, h = bh // H, bh % H
    Q += b * sq_b + h * sq_h
    K += b * sk_b + (h // GROUP) * sk_h
    V += b * sv_b + (h // GROUP) * sv_h
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + rows[:, None] * sq_s + offs_d[None, :], mask=rows[:, None] < SQ, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)      # unnormalised output
    unmasked, hi = _key_blocks(start_m, SK, CAUSAL, BLOCK_M, BLOCK_N)
    lo, starts = 0, rows
    if DOC:  # skip the key blocks wholly before the block's first document; mask the rest
        starts = tl.load(DOCS + b * 2 * SQ + rows, mask=rows < SQ, other=0)
        lo = tl.load(DOCS + b * 2 * SQ + start_m) // BLOCK_N * BLOCK_N
        unmasked = lo
    acc, l_i, m_i = _attn_fwd_blocks(acc, l_i, m_i, q, K, V, rows, starts, lo, unmasked, sk_s, sv_s, SK, qk_scale,
                                     HEAD_DIM, CAUSAL, PRECISION, BLOCK_N, MASK=False, DOC=False)
    acc, l_i, m_i = _attn_fwd_blocks(acc, l_i, m_i, q, K, V, rows, starts, unmasked, hi, sk_s, sv_s, SK, qk_scale,
                                     HEAD_DIM, CAUSAL, PRECISION, BLOCK_N, MASK=True, DOC=DOC)
    # FA2 section 3.1.1: divide by the normaliser once, after the loop.
    out = acc / l_i[:, None]
    tl.store(OUT + b * so_b + h * so_h + rows[:, None] * so_s + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=rows[:, None] < SQ)
    # The log-sum-exp is all backward needs to recompute P (FA2 section 3.1.2); ring
    # attention merges partial results with it. Stored in natural log: * ln(2).
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh * SQ + rows, lse, mask=rows < SQ)


@triton.jit
def _attn_bwd_delta(OUT, DO, DELTA, so_b, so_h, so_s, sdo_b, sdo_h, sdo_s, H, SQ,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """FA2 backward preprocess: delta_i = sum_d dO_id * O_id (= rowsum(dP * P))."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = rows[:, None] < SQ
    o = tl.load(OUT + b * so_b + h * so_h + rows[:, None] * so_s + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_s + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * SQ + rows, delta, mask=rows < SQ)


def _dkdv_configs():
    # dK and dV stay in registers for the whole program (2 x BLOCK_N x D fp32), so the query tiles are small. On sm_90 a
    # dot becomes Hopper's wgmma (HGMMA) only when its M, here BLOCK_N keys, is at least 64: the middle three, none of
    # which spills there at head dims 64 and 128; the first is for the A100 (HMMA only, and it spills least there), the
    # last for fp32. bench/compile_kernels.py prints all of this; the autotuner picks by time.
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in [(64, 32, 8, 3), (32, 64, 8, 3), (32, 128, 8, 2), (16, 128, 8, 3), (32, 32, 4, 1)]]


@_autotune(_dkdv_configs(), triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}),
           key=["SQ_POW2", "SK_POW2", "HEAD_DIM", "CAUSAL", "DOC"])
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DOCS,
                   sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s,
                   HKV, GROUP, SQ, SK, SQ_POW2, SK_POW2, sm_scale, qk_scale,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, DOC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, KV head). It loops over every query head of the group and every
    query block that can see these keys, so dK and dV are summed in registers and written once: no atomics, and GQA
    needs no reduction afterwards. (FA2 section 3.1.2, Algorithm 2's outer loop over K/V blocks; its dQ, which
    Algorithm 2 adds with atomics here, is _attn_bwd_dq's: deterministic, as the Triton tutorial's.)"""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    b, kvh = bh // HKV, bh % HKV
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = cols[:, None] < SK
    k = tl.load(K + b * sk_b + kvh * sk_h + cols[:, None] * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * sv_b + kvh * sv_h + cols[:, None] * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)
    dk, dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32), tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # Causal: query blocks wholly before this key block cannot see it.
    lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
    hi = SQ
    if DOC:  # queries past the document of the block's last key cannot see it
        hi = tl.load(DOCS + b * 2 * SQ + SQ + tl.minimum(start_n + BLOCK_N, SK) - 1)
    for g in range(GROUP):
        h = kvh * GROUP + g
        q_ptr = Q + b * sq_b + h * sq_h
        do_ptr = DO + b * sdo_b + h * sdo_h
        row_ptr = (b * HKV * GROUP + h) * SQ                   # into LSE and DELTA, (B, Hq, SQ)
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            # Keys along rows (transposed from the forward): then P^T and dS^T come straight out of the dots and only
            # loaded tiles are ever transposed, which costs no register shuffles (the Triton tutorial's layout).
            q_t = tl.load(q_ptr + rows[None, :] * sq_s + offs_d[:, None], mask=rows[None, :] < SQ, other=0.0)
            do = tl.load(do_ptr + rows[:, None] * sdo_s + offs_d[None, :], mask=rows[:, None] < SQ, other=0.0)
            lse = tl.load(LSE + row_ptr + rows, mask=rows < SQ, other=0.0)
            delta = tl.load(DELTA + row_ptr + rows, mask=rows < SQ, other=0.0)
            # Recompute P from the saved log-sum-exp instead of storing it.
            s_t = tl.dot(k, q_t, input_precision=PRECISION) * qk_scale               # (BLOCK_N, BLOCK_M)
            keep = (cols[:, None] < SK) & (rows[None, :] < SQ)
            if CAUSAL:
                keep &= cols[:, None] <= rows[None, :]
            if DOC:
                keep &= cols[:, None] >= tl.load(DOCS + b * 2 * SQ + rows, mask=rows < SQ, other=0)[None, :]
            p_t = tl.where(keep, tl.exp2(s_t - lse[None, :] * 1.4426950408889634), 0.0)   # log2(e)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])                                     # dL/d(scaled scores)^T
            dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=PRECISION)
    tl.store(DK + b * sk_b + kvh * sk_h + cols[:, None] * sk_s + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sv_b + kvh * sv_h + cols[:, None] * sv_s + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_dq_blocks(dq, q, do, lse2, delta, K, V, rows, starts, lo, hi, sk_s, sv_s, SK, qk_scale,
                    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr, MASK: tl.constexpr, DOC: tl.constexpr):
    """dQ summed over key blocks lo, lo + BLOCK_N, ... < hi; MASK as in _attn_fwd_blocks."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k, v = _load_kv_block(K, V, cols, sk_s, sv_s, SK, HEAD_DIM, MASK)
        # Recompute P from the saved log-sum-exp instead of storing it.
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
        if MASK:
            keep = cols[None, :] < SK
            if CAUSAL:
                keep &= cols[None, :] <= rows[:, None]
            if DOC:
                keep &= cols[None, :] >= starts[:, None]
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])                                   # dL/d(scaled scores)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@_autotune([triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in [(128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 8, 3), (32, 32, 4, 1)]],
           triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}), key=["SQ_POW2", "SK_POW2", "HEAD_DIM", "CAUSAL", "DOC"])
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, DOCS,
                 sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s,
                 H, GROUP, SQ, SK, SQ_POW2, SK_POW2, sm_scale, qk_scale,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, DOC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head); loops over key blocks like the forward and sums dQ in
    registers. A separate kernel from dK/dV so neither needs atomics (the Triton tutorial's split); it recomputes QK^T
    once more, which is the price. Rows past SQ load zeros and are never stored, so only the key side is masked."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = rows[:, None] < SQ
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_s + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_s + offs_d[None, :], mask=row_mask, other=0.0)
    lse2 = tl.load(LSE + bh * SQ + rows, mask=rows < SQ, other=0.0) * 1.4426950408889634   # log2(e): base 2
    delta = tl.load(DELTA + bh * SQ + rows, mask=rows < SQ, other=0.0)
    K += b * sk_b + (h // GROUP) * sk_h
    V += b * sv_b + (h // GROUP) * sv_h
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    unmasked, hi = _key_blocks(start_m, SK, CAUSAL, BLOCK_M, BLOCK_N)
    lo, starts = 0, rows
    if DOC:  # as the forward: skip the blocks before the first document, mask the rest
        starts = tl.load(DOCS + b * 2 * SQ + rows, mask=rows < SQ, other=0)
        lo = tl.load(DOCS + b * 2 * SQ + start_m) // BLOCK_N * BLOCK_N
        unmasked = lo
    dq = _attn_dq_blocks(dq, q, do, lse2, delta, K, V, rows, starts, lo, unmasked, sk_s, sv_s, SK, qk_scale,
                         HEAD_DIM, CAUSAL, PRECISION, BLOCK_N, MASK=False, DOC=False)
    dq = _attn_dq_blocks(dq, q, do, lse2, delta, K, V, rows, starts, unmasked, hi, sk_s, sv_s, SK, qk_scale,
                         HEAD_DIM, CAUSAL, PRECISION, BLOCK_N, MASK=True, DOC=DOC)
    tl.store(DQ + b * sq_b + h * sq_h + rows[:, None] * sq_s + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_mask)


def _s(t):
    """(batch, head, sequence) strides of a (B, H, S, D) tensor whose last dim is unit-stride."""
    return t.stride(0), t.stride(1), t.stride(2)


def _dense(t):
    """t itself when it is (B, H, S, D)-contiguous or the (B, S, H, D) memory that model.py's
    transpose gives; a copy otherwise. The backward writes dQ, dK, dV through q's, k's and
    v's strides into empty_like tensors, which keep the layout of dense tensors only."""
    return t if t.is_contiguous() or t.transpose(1, 2).is_contiguous() else t.contiguous()


def _doc_bounds(doc_starts):
    """(B, 2, S) int32: each position's document start and end (the next start, or S), what
    the kernels read to mask and to skip whole blocks of other documents."""
    S = doc_starts.shape[1]
    at = torch.arange(S, device=doc_starts.device)
    begins = torch.where(doc_starts == at, at, S)                  # positions that start a document
    after = torch.cat([begins[:, 1:], torch.full_like(begins[:, :1], S)], 1)
    ends = after.flip(1).cummin(1).values.flip(1)
    return torch.stack([doc_starts, ends], 1).to(torch.int32).contiguous()


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, docs):
        q, k, v = _dense(q), _dense(k), _dense(v)
        B, H, SQ, D = q.shape
        HKV, SK = k.shape[1], k.shape[2]
        o = torch.empty_like(q)
        lse = torch.empty(B, H, SQ, device=q.device, dtype=torch.float32)
        _attn_fwd[lambda m: (triton.cdiv(SQ, m["BLOCK_M"]), B * H)](
            q, k, v, o, lse, lse if docs is None else docs, *_s(q), *_s(k), *_s(v), *_s(o), H, H // HKV, SQ, SK,
            triton.next_power_of_2(SQ), triton.next_power_of_2(SK), scale * math.log2(math.e),
            HEAD_DIM=D, CAUSAL=causal, PRECISION=_dot_precision(q), DOC=docs is not None)
        ctx.save_for_backward(q, k, v, o, lse, docs)
        ctx.causal, ctx.scale = causal, scale
        ctx.set_materialize_grads(False)  # an unused out or lse gets None, not a tensor of zeros
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, docs = ctx.saved_tensors
        B, H, SQ, D = q.shape
        do = torch.zeros_like(o) if do is None else (do if do.stride(-1) == 1 else do.contiguous())
        delta = torch.empty_like(lse)
        _attn_bwd_delta[(triton.cdiv(SQ, 64), B * H)](o, do, delta, *_s(o), *_s(do), H, SQ, HEAD_DIM=D, BLOCK_M=64)
        if dlse is not None:
            # lse = logsumexp_j(s_ij) gives d lse_i / d s_ij = P_ij, so its gradient adds
            # dlse_i * P_ij to dS_ij = P_ij (dP_ij - delta_i): the same as delta_i -= dlse_i.
            delta -= dlse
        return (*_flash_backward(q, k, v, do, lse, delta, ctx.causal, ctx.scale, q.dtype, docs), None, None, None)


def _flash_backward(q, k, v, do, lse, delta, causal, scale, grad_dtype, docs=None):
    """dQ, dK, dV in grad_dtype from the row log-sum-exp and delta (FA2 section 3.1.2)."""
    B, H, SQ, D = q.shape
    HKV, SK = k.shape[1], k.shape[2]
    # empty_like keeps the strides of q, k, v (see _dense), which the kernels write through.
    dq, dk, dv = (torch.empty_like(t, dtype=grad_dtype) for t in (q, k, v))
    args = (*_s(q), *_s(k), *_s(v), *_s(do))
    meta = dict(HEAD_DIM=D, CAUSAL=causal, PRECISION=_dot_precision(q), DOC=docs is not None)
    docs = lse if docs is None else docs
    qk_scale = scale * math.log2(math.e)
    lengths = (SQ, SK, triton.next_power_of_2(SQ), triton.next_power_of_2(SK))
    _attn_bwd_dkdv[lambda m: (triton.cdiv(SK, m["BLOCK_N"]), B * HKV)](
        q, k, v, do, lse, delta, dk, dv, docs, *args, HKV, H // HKV, *lengths, scale, qk_scale, **meta)
    _attn_bwd_dq[lambda m: (triton.cdiv(SQ, m["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, docs, *args, H, H // HKV, *lengths, scale, qk_scale, **meta)
    return dq, dk, dv


def _pad_head_dim(t):
    """The kernels take power-of-two head dims from 16 (tl.dot's minimum) up. Zero columns
    change no dot product, so other sizes are padded, and the extra output columns dropped."""
    D = t.shape[-1]
    padded = max(16, triton.next_power_of_2(D))
    return t if padded == D else F.pad(t, (0, padded - D))


def attention_with_lse(q, k, v, causal=True, scale=None, doc_starts=None):
    """q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D) -> out (B, Hq, Sq, D) and lse (B, Hq, Sq), the natural-log log-sum-exp
    of each row's scaled scores, in fp32. Differentiable through both: ring attention merges partial outputs with lse,
    and its backward flows through lse too. Causal needs Sq == Sk (the diagonal block); non-causal takes any lengths.
    doc_starts (B, S): packed documents, where each position's document starts; a query sees only the keys of its own
    (causal within it), and the kernels skip blocks of other documents."""
    if doc_starts is not None and not (causal and doc_starts.shape == (q.shape[0], q.shape[2])):
        raise ValueError(f"documents need causal attention and doc_starts of shape {(q.shape[0], q.shape[2])}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs equal query and key lengths, got {q.shape[2]} and {k.shape[2]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    if not use_triton(q):
        return attention_with_lse_ref(q, k, v, causal, scale, doc_starts)
    docs = _doc_bounds(doc_starts) if doc_starts is not None else None
    out, lse = _FlashAttention.apply(_pad_head_dim(q), _pad_head_dim(k), _pad_head_dim(v), causal, scale, docs)
    return out[..., :D], lse


def attention(q, k, v, causal=True, scale=None, doc_starts=None):
    """softmax(q k^T * scale) v with grouped-query heads; the layout of torch's SDPA."""
    if not use_triton(q):
        return attention_ref(q, k, v, causal, scale, doc_starts)
    return attention_with_lse(q, k, v, causal, scale, doc_starts)[0]


def attention_block_backward_ref(q, k, v, dout, lse, delta, causal=True, scale=None):
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dt = torch.promote_types(q.dtype, torch.float32)
    q, dout = q.to(dt), dout.to(dt)
    k, v = k.repeat_interleave(group, 1).to(dt), v.repeat_interleave(group, 1).to(dt)
    s = q @ k.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    p = torch.exp(s - lse[..., None])                                            # (B, Hq, Sq, Sk)
    ds = p * (dout @ v.transpose(-1, -2) - delta[..., None])
    fold = lambda x: x.unflatten(1, (-1, group)).sum(2)  # noqa: E731  (a shared K/V head sums its group)
    return ds @ k * scale, fold(ds.transpose(-1, -2) @ q * scale), fold(p.transpose(-1, -2) @ dout)


def attention_block_backward(q, k, v, dout, lse, delta, causal=True, scale=None):
    """Ring attention's backward step: the gradients of one (query block, K/V block) pair of a larger attention, given
    lse (B, Hq, Sq) and delta = rowsum(dout * out) (B, Hq, Sq) of the whole rows (all K/V blocks merged; minus dlse when
    lse itself has a gradient): P = exp(q k^T * scale - lse), dv = P^T dout, dS = P * (dout v^T - delta),
    dq = dS k * scale, dk = dS^T q * scale. A row's dq is the sum over its blocks, so all three come back in fp32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not use_triton(q):
        return attention_block_backward_ref(q, k, v, dout, lse, delta, causal, scale)
    D = q.shape[-1]
    q, k, v, dout = (_dense(_pad_head_dim(t)) for t in (q, k, v, dout.to(q.dtype)))
    dq, dk, dv = _flash_backward(q, k, v, dout, lse.float().contiguous(), delta.float().contiguous(),
                                 causal, scale, torch.float32)
    return dq[..., :D], dk[..., :D], dv[..., :D]


# ----------------------------------------------------------------------------------------
# RMSNorm. One program per row in the forward; in the backward one program per group of rows, so the weight gradient is
# summed in registers and only (programs, N) partial sums reach memory (no atomics).

def rms_norm_ref(x, weight, eps):
    # Statistics in fp32, then back to x's dtype before the weight: the order of
    # transformers' LlamaRMSNorm, so bf16 outputs match it bit for bit.
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * y.to(x.dtype)
    # Under autocast, x's dtype (the one autocast's next matmul would cast to anyway): an fp32
    # weight must not lift QK-norm's bf16 q and k away from v's dtype. Outside it, promote.
    return y.to(x.dtype) if torch.is_autocast_enabled(x.device.type) else y


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    x_hat = (x * rstd).to(X.dtype.element_ty).to(tl.float32)   # the reference's cast before the weight
    tl.store(Y + row * stride_y + cols, (w * x_hat).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, N, rows_per_program,
                  BLOCK: tl.constexpr):
    """dx = rstd * (g - x_hat * mean(g * x_hat)) with g = dy * w; dw = sum over rows of dy * x_hat."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program     # int64 rows: row * stride can pass 2^31
    for row in range(row_start, tl.minimum(row_start + rows_per_program, n_rows)):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        dw += dy * x_hat.to(X.dtype.element_ty).to(tl.float32)
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, 0) / N))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)


def _row_block(N):
    block = triton.next_power_of_2(N)
    return dict(BLOCK=block, num_warps=min(16, max(1, block // 256)))  # ~8 fp32 values per thread per row


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = _rows(x)
        n_rows, N = x2.shape
        # The reference's dtype: x's under autocast, else promoted (fp32 weight on bf16 x: fp32).
        dtype = x.dtype if torch.is_autocast_enabled(x.device.type) else torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty(n_rows, N, device=x.device, dtype=dtype)
        rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        _rms_norm_fwd[(n_rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), N, eps, **_row_block(N))
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        n_rows, N = x2.shape
        dx = torch.empty_like(x2)
        # A few programs per SM on a GPU; a handful under the interpreter.
        sms = torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 1
        programs = min(n_rows, 4 * sms)
        rows_per_program = triton.cdiv(n_rows, programs)
        programs = triton.cdiv(n_rows, rows_per_program)
        dw_partial = torch.empty(programs, N, device=x2.device, dtype=torch.float32)
        _rms_norm_bwd[(programs,)](dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0), dx.stride(0),
                                   n_rows, N, rows_per_program, **_row_block(N))
        return dx.view(dy.shape), dw_partial.sum(0).to(weight.dtype), None


def rms_norm(x, weight, eps):
    if not use_triton(x):
        return rms_norm_ref(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)


# ----------------------------------------------------------------------------------------
# SwiGLU: elementwise. The backward recomputes silu from gate instead of keeping the
# activation (it is cheap arithmetic on data that must be read anyway).

def swiglu_ref(gate, up):
    return F.silu(gate) * up


@triton.jit
def _swiglu_fwd(GATE, UP, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (g * tl.sigmoid(g) * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(GATE, UP, DOUT, DGATE, DUP, n, BLOCK: tl.constexpr):
    """d up = dout * silu(g); d gate = dout * up * silu'(g), silu'(g) = sig * (1 + g * (1 - sig))."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(DUP + offs, (dout * g * sig).to(DUP.dtype.element_ty), mask=mask)
    tl.store(DGATE + offs, (dout * u * sig * (1.0 + g * (1.0 - sig))).to(DGATE.dtype.element_ty), mask=mask)


SWIGLU_BLOCK = 1024  # elements per program: 4 warps x 32 threads x 8 values (16-byte bf16 vectors)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate, dtype=torch.promote_types(gate.dtype, up.dtype))
        n = gate.numel()
        _swiglu_fwd[(triton.cdiv(n, SWIGLU_BLOCK),)](gate, up, out, n, BLOCK=SWIGLU_BLOCK)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_bwd[(triton.cdiv(n, SWIGLU_BLOCK),)](gate, up, dout, dgate, dup, n, BLOCK=SWIGLU_BLOCK)
        return dgate, dup


def swiglu(gate, up):
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    if not use_triton(gate):
        return swiglu_ref(gate, up)
    return _SwiGLU.apply(gate, up)


# ----------------------------------------------------------------------------------------
# Cross-entropy. One program per row walks the vocabulary in blocks with an online log-sum-exp, so the fp32 softmax of a
# (tokens, vocab) matrix never exists; the forward keeps only the row's lse. The backward re-reads the logits and writes
# the gradient, in place when the caller owns the logits (linear_cross_entropy below does).

def cross_entropy_ref(logits, targets, ignore_index=-100, z_loss=0.0):
    """Mean cross-entropy over targets != ignore_index, plus z_loss * mean(logsumexp^2)
    (PaLM, section 5: keeps the softmax normaliser near 1)."""
    logits = logits.float()
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index)
    if z_loss:
        keep = targets != ignore_index
        loss = loss + z_loss * torch.logsumexp(logits[keep], dim=-1).pow(2).mean()
    return loss


@triton.jit
def _ce_fwd(LOGITS, TARGETS, LOSS, LSE, stride, V, ignore_index, z_loss, BLOCK_V: tl.constexpr):
    """loss_row = lse - logit[target] + z_loss * lse^2, or 0 for an ignored target."""
    row = tl.program_id(0).to(tl.int64)                  # int64: row * vocab passes 2^31 at 128k vocab
    LOGITS += row * stride
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)          # running max
    d = tl.zeros([], tl.float32)                         # running sum of exp(x - m)
    for start in range(0, V, BLOCK_V):
        x = tl.load(LOGITS + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))             # each block holds a real logit: finite
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(d)
    t = tl.load(TARGETS + row)
    keep = t != ignore_index
    x_t = tl.load(LOGITS + t, mask=keep, other=0.0).to(tl.float32)
    tl.store(LOSS + row, tl.where(keep, lse - x_t + z_loss * lse * lse, 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _ce_bwd(LOGITS, TARGETS, LSE, DLOGITS, SCALE, stride, stride_d, V, ignore_index, z_loss, BLOCK_V: tl.constexpr):
    """d loss_row / d x = softmax(x) * (1 + 2 z_loss lse) - onehot(target), times SCALE (grad_output / number of kept
    targets, on device: no host sync). DLOGITS may be LOGITS itself: each block is read before it is overwritten."""
    row = tl.program_id(0).to(tl.int64)
    LOGITS += row * stride
    DLOGITS += row * stride_d
    t = tl.load(TARGETS + row)
    lse = tl.load(LSE + row)
    scale = tl.where(t != ignore_index, tl.load(SCALE), 0.0)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        x = tl.load(LOGITS + start + cols, mask=start + cols < V, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        grad = p * (1.0 + 2.0 * z_loss * lse) - tl.where(start + cols == t, 1.0, 0.0)
        tl.store(DLOGITS + start + cols, (grad * scale).to(DLOGITS.dtype.element_ty), mask=start + cols < V)


def _ce_block(V):
    # 4096 logits per step on a GPU (16 KB of fp32 per row in flight); 128 under the
    # interpreter, so small test vocabularies still take several blocks.
    return min(128 if INTERPRET else 4096, triton.next_power_of_2(V))


def _ce_rows(logits, targets, ignore_index, z_loss):
    """Per-row loss and lse (fp32) of a (rows, V) logits matrix."""
    n, V = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    _ce_fwd[(n,)](logits, targets, loss, lse, logits.stride(0), V, ignore_index, z_loss,
                  BLOCK_V=_ce_block(V), num_warps=8)
    return loss, lse


def _ce_grad(logits, targets, lse, scale, ignore_index, z_loss, out):
    n, V = logits.shape
    _ce_bwd[(n,)](logits, targets, lse, out, scale, logits.stride(0), out.stride(0), V, ignore_index, z_loss,
                  BLOCK_V=_ce_block(V), num_warps=8)
    return out


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, z_loss):
        logits, targets = _rows(logits), targets.contiguous()
        loss, lse = _ce_rows(logits, targets, ignore_index, z_loss)
        n_kept = (targets != ignore_index).sum()
        ctx.save_for_backward(logits, targets, lse, n_kept)
        ctx.ignore_index, ctx.z_loss = ignore_index, z_loss
        return loss.sum() / n_kept                     # 0/0 = nan when every target is ignored, like torch

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse, n_kept = ctx.saved_tensors
        dlogits = _ce_grad(logits, targets, lse, grad.float() / n_kept, ctx.ignore_index, ctx.z_loss,
                           out=torch.empty_like(logits))
        return dlogits, None, None, None


def cross_entropy(logits, targets, ignore_index=-100, z_loss=0.0):
    """logits (N, V), targets (N,) -> mean loss over targets != ignore_index (+ z-loss)."""
    if not use_triton(logits):
        return cross_entropy_ref(logits, targets, ignore_index, z_loss)
    return _CrossEntropy.apply(logits, targets, ignore_index, z_loss)


# ----------------------------------------------------------------------------------------
# Linear + cross-entropy, fused the way Liger's FusedLinearCrossEntropy does it: the LM head runs on a chunk of rows at
# a time, the chunk's logits are turned into their own gradient in place, and dh and dW are accumulated right away, in
# the forward. At a 128k vocabulary the (tokens, vocab) logits and their gradient are the largest tensors of a step;
# here only one chunk of them exists at a time.

def linear_cross_entropy_ref(h, weight, targets, ignore_index=-100, z_loss=0.0):
    """h (N, d), weight (V, d), targets (N,) -> cross_entropy_ref(h @ weight.T, targets)."""
    return cross_entropy_ref(F.linear(h, weight), targets, ignore_index, z_loss)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, z_loss, chunk):
        targets = targets.contiguous()
        n_kept = (targets != ignore_index).sum()
        scale = 1.0 / n_kept.float()                   # on device: the loop below never syncs
        want_dh, want_dw = ctx.needs_input_grad[:2]
        dh = torch.empty_like(h) if want_dh else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if want_dw else None   # summed over chunks in fp32
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        for i in range(0, h.shape[0], chunk):
            hc, tc = h[i:i + chunk], targets[i:i + chunk]
            logits = hc @ weight.T                     # (chunk, V); under autocast in its dtype
            loss, lse = _ce_rows(logits, tc, ignore_index, z_loss)
            total += loss.sum()
            if want_dh or want_dw:
                g = _ce_grad(logits, tc, lse, scale, ignore_index, z_loss, out=logits)  # in place
                if want_dh:
                    dh[i:i + chunk] = g @ weight       # (chunk, d)
                if want_dw:
                    dw += g.T @ hc                     # (V, d)
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        # The forward already took d loss / d h and d loss / d W; the chain rule scales them.
        dh = dh * grad.to(dh.dtype) if dh is not None else None
        dw = (dw * grad).to(ctx.weight_dtype) if dw is not None else None
        return dh, dw, None, None, None, None


def linear_cross_entropy(h, weight, targets, ignore_index=-100, z_loss=0.0, chunk=None):
    """Mean cross-entropy of logits h @ weight.T without the full logits: h (N, d), weight (V, d),
    targets (N,). chunk: rows per step; by default sized so a chunk's logits are about as big
    as h (Liger's rule), which bounds the extra memory by h's size."""
    if not use_triton(h):
        return linear_cross_entropy_ref(h, weight, targets, ignore_index, z_loss)
    if not torch.is_grad_enabled():   # needs_input_grad follows requires_grad, not no_grad (eval)
        h, weight = h.detach(), weight.detach()
    (N, d), V = h.shape, weight.shape[0]
    chunk = chunk or triton.next_power_of_2(triton.cdiv(N, triton.cdiv(V, d)))
    return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, z_loss, chunk)


# ----------------------------------------------------------------------------------------
# Weight-only quantized linears for decoding, in the formats infer.py's quantizer writes. At 1..16 rows a linear layer
# is bound by reading its weight: dequantize-then-matmul reads the int weight, writes a 16-bit copy and reads that
# again; the kernel reads the int weight once and dequantizes it in registers. Inference only: no backward (no
# autograd.Function), and the ops refuse an input that requires a gradient rather than return one without it.

def unpack_int4(qweight):
    """(out, in // 2) uint8 -> (out, in) uint8: byte j holds column 2j in its low nibble, 2j + 1 in its high."""
    return torch.stack([qweight & 0xF, qweight >> 4], -1).flatten(-2)


def int8_linear_ref(x, qweight, scales):
    """x (..., in) @ W.T, W = qweight (out, in) int8 * scales (out,)[:, None]: dequantized in fp32
    (fp64 for fp64 x), rounded to x's dtype once, as a 16-bit copy of the weight would be."""
    dt = torch.promote_types(x.dtype, torch.float32)
    return F.linear(x, (qweight.to(dt) * scales.to(dt)[:, None]).to(x.dtype))


def int4_linear_ref(x, qweight, scales, zeros, group_size):
    """x (..., in) @ W.T, W[o, i] = (q[o, i] - zeros[o, i // g]) * scales[o, i // g] with q the
    nibbles of qweight (unpack_int4); dequantized and rounded as int8_linear_ref does."""
    dt = torch.promote_types(x.dtype, torch.float32)
    s, z = (t.to(dt).repeat_interleave(group_size, 1) for t in (scales, zeros))
    return F.linear(x, ((unpack_int4(qweight).to(dt) - z) * s).to(x.dtype))


def _quant_linear_configs():
    # (BLOCK_N features, BLOCK_K inputs, warps, stages): a step streams BLOCK_N x BLOCK_K
    # weight bytes (half that for int4); a few stages in flight keep the loads coming.
    return [triton.Config({"BLOCK_M": 16, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for n, k, w, s in [(64, 128, 4, 4), (64, 256, 4, 3), (32, 256, 4, 4), (128, 128, 8, 3)]]


@triton.jit
def _dot_dequantized(acc, w, X, rows, cols, sx, M, K, PRECISION: tl.constexpr):
    """acc + w @ x[rows, cols]^T, w (BLOCK_N, len(cols)) fp32, rounded to x's dtype like the references' W."""
    x_t = tl.load(X + rows[None, :] * sx + cols[:, None], mask=(rows[None, :] < M) & (cols[:, None] < K), other=0.0)
    return tl.dot(w.to(x_t.dtype), x_t, acc, input_precision=PRECISION)


@_autotune(_quant_linear_configs(), triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}),
           key=["M_POW2", "N", "K", "INT4", "GROUP"])
@triton.jit
def _quant_linear(X, QW, S, Z, OUT, M, N, K, M_POW2, sx, sw, ss, so, INT4: tl.constexpr, GROUP: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: BLOCK_N output features of BLOCK_M rows, over K in BLOCK_K steps. Computed transposed, out^T = W x^T
    ("swap AB"): the features fill the dot's M side, the few rows of x (padded to tl.dot's minimum of 16) its N side,
    and the dequantized tile is the register operand. INT4: a step's bytes hold its even columns (low nibbles) and odd
    ones (high nibbles): two half-tiles, each dotted with x's matching strided columns, no interleave. A step stays in
    one group, so its scales and zeros are one per feature (gathered per element, they spill)."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)     # int64: n * sw can pass 2^31
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    STEP: tl.constexpr = min(BLOCK_K, GROUP) if INT4 else BLOCK_K
    for k0 in range(0, K, STEP):
        if INT4:
            j = k0 // 2 + tl.arange(0, STEP // 2)                            # bytes: columns 2j and 2j + 1
            b = tl.load(QW + n[:, None] * sw + j[None, :], mask=(n[:, None] < N) & (j[None, :] < K // 2), other=0)
            s = tl.load(S + n * ss + k0 // GROUP, mask=n < N, other=0.0).to(tl.float32)[:, None]
            z = tl.load(Z + n * ss + k0 // GROUP, mask=n < N, other=0.0).to(tl.float32)[:, None]
            acc = _dot_dequantized(acc, ((b & 0xF).to(tl.float32) - z) * s, X, rows, 2 * j, sx, M, K, PRECISION)
            acc = _dot_dequantized(acc, ((b >> 4).to(tl.float32) - z) * s, X, rows, 2 * j + 1, sx, M, K, PRECISION)
        else:
            cols = k0 + tl.arange(0, BLOCK_K)
            q = tl.load(QW + n[:, None] * sw + cols[None, :], mask=(n[:, None] < N) & (cols[None, :] < K), other=0)
            acc = _dot_dequantized(acc, q.to(tl.float32), X, rows, cols, sx, M, K, PRECISION)
    if not INT4:  # int8 values are exact in any dtype: the row's one scale goes on the sums
        acc *= tl.load(S + n, mask=n < N, other=0.0).to(tl.float32)[:, None]
    tl.store(OUT + rows[None, :] * so + n[:, None], acc.to(OUT.dtype.element_ty),
             mask=(n[:, None] < N) & (rows[None, :] < M))


def _quant_linear_launch(x, qweight, scales, zeros=None, group_size=0):
    """int4 when given zeros, else int8 (GROUP unused)."""
    x2 = _rows(x)
    (M, K), N = x2.shape, qweight.shape[0]
    qweight, scales = qweight.contiguous(), scales.contiguous()
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))  # noqa: E731
    _quant_linear[grid](x2, qweight, scales, scales if zeros is None else zeros.contiguous(), out,
                        M, N, K, triton.next_power_of_2(M), x2.stride(0), qweight.stride(0), scales.stride(0),
                        out.stride(0), INT4=zeros is not None, GROUP=group_size, PRECISION=_dot_precision(x))
    return out.view(*x.shape[:-1], N)


def _check_quant(name, x, qweight, dtype, want):
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(f"{name} is inference only (no backward): call it under torch.no_grad()")
    if qweight.dtype != dtype or tuple(qweight.shape) != want:
        raise ValueError(f"{name}: qweight {tuple(qweight.shape)} {qweight.dtype}, want {want} {dtype} "
                         f"for x {tuple(x.shape)}")


def int8_linear(x, qweight, scales):
    """x (..., in) @ (qweight * scales[:, None]).T in x's dtype; qweight (out, in) int8, scales (out,)."""
    _check_quant("int8_linear", x, qweight, torch.int8, (scales.numel(), x.shape[-1]))
    if not use_triton(x):
        return int8_linear_ref(x, qweight, scales)
    return _quant_linear_launch(x, qweight, scales)


def int4_linear(x, qweight, scales, zeros, group_size):
    """x (..., in) @ W.T in x's dtype, W from packed 4-bit qweight (out, in // 2) uint8 and
    per-group scales and zeros (out, in // group_size): see int4_linear_ref."""
    K = x.shape[-1]
    if group_size < 32 or group_size & (group_size - 1) or K % group_size:   # a kernel step: 2 x 16 columns
        raise ValueError(f"int4_linear: group_size {group_size} must be a power of two from 32, "
                         f"and the {K} input features (an even number) a multiple of it")
    _check_quant("int4_linear", x, qweight, torch.uint8, (scales.shape[0], K // 2))
    if scales.shape != zeros.shape or scales.shape[1] != K // group_size:
        raise ValueError(f"int4_linear: scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)}, "
                         f"want ({qweight.shape[0]}, {K // group_size})")
    if not use_triton(x):
        return int4_linear_ref(x, qweight, scales, zeros, group_size)
    return _quant_linear_launch(x, qweight, scales, zeros, group_size)


# ----------------------------------------------------------------------------------------
# Grouped matmul for dropless Mixture-of-Experts, after MegaBlocks (Gale et al. 2023) and ScatterMoE (Tan et al. 2024):
# with tokens sorted by expert, one launch multiplies each expert's rows, however many, by its weight. Dropless: no
# capacity, so no token is dropped and no padded (experts, capacity, d) copy is made. A row tile never spans two groups
# (rows past its group's end are masked); each program finds its group from counts on the device, so nothing waits for
# the host: the grid is an upper bound, cdiv(T, BLOCK_M) + G tiles (a group wastes at most one partial tile), and the
# surplus programs return at once.

def grouped_matmul_ref(x, w, counts):
    """x (T, K) rows sorted by group, w (G, N, K), counts (G,) summing to T -> y (T, N) with
    y[rows of g] = x[rows of g] @ w[g].T."""
    return torch.cat([xg @ wg.T for xg, wg in zip(x.split(counts.tolist()), w)])


def _gmm_configs():
    # The Triton matmul tutorial's tiles, BLOCK_M x BLOCK_N outputs over BLOCK_K steps (dW: BLOCK_N x
    # BLOCK_K over BLOCK_M rows). The first four are wgmma on sm_90 in 16-bit, without spills
    # (bench/compile_kernels.py); the last is for fp32 without TF32 (CUDA-core dots), where they spill.
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in
            [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 32, 4, 2)]]


# Keyed on sw_k too: the forward (sw_k = 1) and dx (sw_n = 1) read w in different orders.
@_autotune(_gmm_configs(), triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}), key=["N", "K", "sw_k"])
@triton.jit
def _grouped_mm(X, W, Y, COUNTS, N, K, G, sx, sw_g, sw_n, sw_k, sy, G_POW2: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: BLOCK_M rows of one group by BLOCK_N outputs, Y[rows] = X[rows] @ B with
    B[k, n] at W + g * sw_g + n * sw_n + k * sw_k: w[g].T in the forward, w[g] itself for dx."""
    tile = tl.program_id(0)
    gs = tl.arange(0, G_POW2)
    counts = tl.load(COUNTS + gs, mask=gs < G, other=0).to(tl.int64)
    tile_ends = tl.cumsum((counts + BLOCK_M - 1) // BLOCK_M, 0)   # each group starts a new tile
    before = tile_ends <= tile                                      # the groups wholly before this tile
    g = tl.sum(before.to(tl.int32), 0)
    if g >= G:
        return
    start = tl.sum(tl.where(before, counts, 0), 0)                  # the group's first row
    end = start + tl.sum(tl.where(gs == g, counts, 0), 0)
    rows = start + (tile - tl.max(tl.where(before, tile_ends, 0), 0)) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    W += g.to(tl.int64) * sw_g
    in_group = rows[:, None] < end
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(X + rows[:, None] * sx + ks[None, :], mask=in_group & (ks[None, :] < K), other=0.0)
        b = tl.load(W + ks[:, None] * sw_k + ns[None, :] * sw_n, mask=(ks[:, None] < K) & (ns[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(Y + rows[:, None] * sy + ns[None, :], acc.to(Y.dtype.element_ty), mask=in_group & (ns[None, :] < N))


@_autotune(_gmm_configs(), triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}), key=["N", "K"])
@triton.jit
def _grouped_mm_dw(DY, X, DW, COUNTS, N, K, G, sdy, sx, sdw_g, sdw_n, sdw_k, G_POW2: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: a BLOCK_N x BLOCK_K tile of dW[g] = dy_g^T x_g, summed over the group's rows
    in registers (no atomics, no partial sums in memory); an empty group's tile is written as 0."""
    g = tl.program_id(0)
    gs = tl.arange(0, G_POW2)
    counts = tl.load(COUNTS + gs, mask=gs < G, other=0).to(tl.int64)
    start = tl.sum(tl.where(gs < g, counts, 0), 0)
    end = start + tl.sum(tl.where(gs == g, counts, 0), 0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        dy_t = tl.load(DY + rows[None, :] * sdy + ns[:, None], mask=(rows[None, :] < end) & (ns[:, None] < N),
                       other=0.0)
        x = tl.load(X + rows[:, None] * sx + ks[None, :], mask=(rows[:, None] < end) & (ks[None, :] < K), other=0.0)
        acc = tl.dot(dy_t, x, acc, input_precision=PRECISION)
    tl.store(DW + g.to(tl.int64) * sdw_g + ns[:, None] * sdw_n + ks[None, :] * sdw_k, acc.to(DW.dtype.element_ty),
             mask=(ns[:, None] < N) & (ks[None, :] < K))


def _grouped_mm_launch(x, w, counts, N, sw_n, sw_k):
    """(T, N): x's rows of group g times B[k, n] = w[g] at n * sw_n + k * sw_k."""
    (T, K), G = x.shape, w.shape[0]
    y = torch.empty(T, N, device=x.device, dtype=x.dtype)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]) + G, triton.cdiv(N, m["BLOCK_N"]))  # noqa: E731
    _grouped_mm[grid](x, w, y, counts, N, K, G, x.stride(0), w.stride(0), sw_n, sw_k, y.stride(0),
                      G_POW2=triton.next_power_of_2(G), PRECISION=_dot_precision(x))
    return y


class _GroupedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, counts):
        x, counts = _rows(x), counts.contiguous()
        ctx.save_for_backward(x, w, counts)
        return _grouped_mm_launch(x, w, counts, w.shape[1], w.stride(1), w.stride(2))     # B = w[g].T

    @staticmethod
    def backward(ctx, dy):
        x, w, counts = ctx.saved_tensors
        dy, (G, N, K) = _rows(dy), w.shape
        dx = dw = None
        if ctx.needs_input_grad[0]:   # dy_g @ w[g]: the forward kernel with w's strides swapped, no transposed copy
            dx = _grouped_mm_launch(dy, w, counts, K, w.stride(2), w.stride(1))
        if ctx.needs_input_grad[1]:
            dw = torch.empty_like(w)
            grid = lambda m: (G, triton.cdiv(N, m["BLOCK_N"]), triton.cdiv(K, m["BLOCK_K"]))  # noqa: E731
            _grouped_mm_dw[grid](dy, x, dw, counts, N, K, G, dy.stride(0), x.stride(0), *dw.stride(),
                                 G_POW2=triton.next_power_of_2(G), PRECISION=_dot_precision(x))
        return dx, dw, None


def grouped_matmul(x, w, counts):
    """y (T, N), y[rows of g] = x[rows of g] @ w[g].T: x (T, K) sorted by group, w (G, N, K)
    (nn.Linear's layout per group), counts (G,) int64 on x's device, summing to T (unchecked on
    the Triton path: checking would wait for the device). w is cast to x's dtype."""
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[2] or counts.shape != w.shape[:1]:
        raise ValueError(f"grouped_matmul: x {tuple(x.shape)}, w {tuple(w.shape)}, counts {tuple(counts.shape)}; "
                         "want x (T, K), w (G, N, K), counts (G,)")
    w = w.to(x.dtype)
    if not use_triton(x):
        return grouped_matmul_ref(x, w, counts)
    return _GroupedMatmul.apply(x, w, counts)


# ----------------------------------------------------------------------------------------
# Selective scan, the S6 layer of Mamba (Gu & Dao 2023, Algorithm 2). Per channel c and state n,
# h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t and y_t = C_t . h_t + D x_t (B discretised as dt B, as mamba_ssm does, not by
# the zero-order hold). dt, B and C depend on the input, so unlike S4 there is no convolution to compute: it is a linear
# recurrence, and two steps h -> a1 h + b1, then h -> a2 h + b2, make one, (a1 a2, a2 b1 + b2). That composition is
# associative, so a parallel prefix scan finds every h_t in log depth (Blelloch 1990; Martin & Cundy 2018 for linear
# recurrences). A program scans (tl.associative_scan) a chunk of BLOCK_L steps of its BLOCK_D channels x N states at
# once, and carries the last state into the next chunk. As in the paper (section 3.3.2) the (batch, L, d, N) states
# never reach memory: the backward recomputes a chunk's from the state before it, kept for each chunk.

def selective_scan_ref(x, dt, A, B, C, D, return_last_state=False):
    """y (batch, L, d) in x's dtype, and with return_last_state also h_L (batch, d, N): x and dt (batch, L, d), dt > 0
    (softplus and bias already applied), A (d, N) < 0, B and C (batch, L, N), D (d,). Step by step over time, the state
    in fp32 (fp64 for fp64 inputs): mamba_ssm's selective_scan_ref with delta_softplus=False and no z or delta_bias."""
    f = torch.promote_types(x.dtype, torch.float32)
    xf, dt, A, B, C, D = (t.to(f) for t in (x, dt, A, B, C, D))
    h = xf.new_zeros(x.shape[0], x.shape[2], A.shape[1])                                     # (batch, d, N)
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * xf[:, t])[:, :, None] * B[:, t, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    y = (torch.stack(ys, 1) + xf * D).to(x.dtype)                                            # (batch, L, d)
    return (y, h) if return_last_state else y


def _scan_blocks(n):
    """(BLOCK_L steps, BLOCK_D channels) for n states: 8 x 4 under the interpreter, so 17 steps take three chunks and 6
    channels two blocks, the last ones partial. On a GPU 16 x 512 / n: for 16 states the backward fits in 255 registers
    at 8 warps, the forward at 4 or 8, without spills on sm_90 and sm_80 (bench/compile_kernels.py). Only the warps are
    tuned: the tile shapes the backward's buffers."""
    return (8, 4) if INTERPRET else (16, max(8, 512 // triton.next_power_of_2(n)))


@triton.jit
def _scan_combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2        # h -> a1 h + b1, then h -> a2 h + b2


@triton.jit
def _scan_tile(P, rows, cols, R, W):
    """The rows < R and columns < W of the row-major (R, W) array at P, in fp32; 0 elsewhere."""
    mask = (rows[:, None] < R) & (cols[None, :] < W)
    return tl.load(P + rows[:, None] * W + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _scan_store(P, rows, cols, R, W, v):
    tl.store(P + rows[:, None] * W + cols[None, :], v.to(P.dtype.element_ty),
             mask=(rows[:, None] < R) & (cols[None, :] < W))


@triton.jit
def _scan_chunk(h0, x, dt, b, a):
    """The states h_t (BLOCK_L, BLOCK_D, N) of a chunk after h0 (BLOCK_D, N), and u_t = dt_t B_t x_t.
    Steps past L have dt = 0, so are h -> h: the last row is the state after the last real step."""
    u = (dt * x)[:, :, None] * b[:, None, :]
    decay, hs = tl.associative_scan((tl.exp(dt[:, :, None] * a[None, :, :]), u), 0, _scan_combine)
    return decay * h0[None, :, :] + hs, u


@triton.jit
def _scan_row(v, i, BLOCK_L: tl.constexpr):
    """v[i] of a (BLOCK_L, ...) tile (registers cannot be indexed: a masked sum over the rows)."""
    return tl.sum(tl.where(tl.arange(0, BLOCK_L)[:, None, None] == i, v, 0.0), 0)


@_autotune([triton.Config({}, num_warps=w) for w in (4, 8)], triton.Config({}), key=["DIM", "NSTATE", "ALL_STATES"])
@triton.jit
def _selective_scan_fwd(X, DT, A, B, C, D, Y, H, L, DIM, NSTATE, N_POW2: tl.constexpr, ALL_STATES: tl.constexpr,
                        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: BLOCK_D channels of one sequence, all N states, one chunk of time after another.
    Writes y and the last state, H (batch, d, N); ALL_STATES (for the backward): no y, and the state
    before every chunk, H (batch, chunks, d, N)."""
    bi = tl.program_id(0).to(tl.int64)                  # int64: bi * L * DIM can pass 2^31
    cs, ns = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D), tl.arange(0, N_POW2)
    X, DT, Y, B, C = X + bi * L * DIM, DT + bi * L * DIM, Y + bi * L * DIM, B + bi * L * NSTATE, C + bi * L * NSTATE
    a = _scan_tile(A, cs, ns, DIM, NSTATE)                                                # (BLOCK_D, N)
    d = tl.load(D + cs, mask=cs < DIM, other=0.0).to(tl.float32)
    h = tl.zeros([BLOCK_D, N_POW2], tl.float32)
    chunks, hmask = tl.cdiv(L, BLOCK_L), (cs[:, None] < DIM) & (ns[None, :] < NSTATE)
    for k in range(chunks):
        t = k * BLOCK_L + tl.arange(0, BLOCK_L)
        if ALL_STATES:
            tl.store(H + ((bi * chunks + k) * DIM + cs[:, None]) * NSTATE + ns[None, :], h, mask=hmask)
        x, dt = _scan_tile(X, t, cs, L, DIM), _scan_tile(DT, t, cs, L, DIM)                # (BLOCK_L, BLOCK_D)
        hs, _ = _scan_chunk(h, x, dt, _scan_tile(B, t, ns, L, NSTATE), a)
        h = _scan_row(hs, BLOCK_L - 1, BLOCK_L)                  # carried into the next chunk
        if not ALL_STATES:
            _scan_store(Y, t, cs, L, DIM, tl.sum(hs * _scan_tile(C, t, ns, L, NSTATE)[:, None, :], 2) + d * x)
    if not ALL_STATES:
        tl.store(H + (bi * DIM + cs[:, None]) * NSTATE + ns[None, :], h, mask=hmask)


@_autotune([triton.Config({}, num_warps=8)], triton.Config({}), key=["DIM", "NSTATE"])
@triton.jit
def _selective_scan_bwd(X, DT, A, B, C, D, DY, H, DX, DDT, DA, DB, DC, DD, L, DIM, NSTATE, N_POW2: tl.constexpr,
                        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: BLOCK_D channels of one sequence, chunks last to first. A chunk's states are
    recomputed from H (the forward's ALL_STATES), then g_t = dLoss/dh_t by the reverse recurrence
    g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}, a scan run backwards. Written: dx, ddt; DA (batch, d, N)
    and DD (batch, d) summed over time, DB and DC (batch, blocks, L, N) over the block's channels, for
    the launcher to sum over the rest: no atomics, so the gradients are reproducible."""
    bi, blk = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cs, ns = blk * BLOCK_D + tl.arange(0, BLOCK_D), tl.arange(0, N_POW2)
    off, part = bi * L * DIM, (bi * tl.num_programs(1) + blk) * L * NSTATE
    X, DT, DY, DX, DDT = X + off, DT + off, DY + off, DX + off, DDT + off
    B, C, DB, DC = B + bi * L * NSTATE, C + bi * L * NSTATE, DB + part, DC + part
    a = _scan_tile(A, cs, ns, DIM, NSTATE)
    d = tl.load(D + cs, mask=cs < DIM, other=0.0).to(tl.float32)
    g = tl.zeros([BLOCK_D, N_POW2], tl.float32)          # dLoss/dh at the first step of the next chunk
    da, dd = tl.zeros([BLOCK_D, N_POW2], tl.float32), tl.zeros([BLOCK_D], tl.float32)
    chunks, hmask = tl.cdiv(L, BLOCK_L), (cs[:, None] < DIM) & (ns[None, :] < NSTATE)
    for j in range(chunks):
        k = chunks - 1 - j
        t = k * BLOCK_L + tl.arange(0, BLOCK_L)
        x, dt, dy = _scan_tile(X, t, cs, L, DIM), _scan_tile(DT, t, cs, L, DIM), _scan_tile(DY, t, cs, L, DIM)
        b, c = _scan_tile(B, t, ns, L, NSTATE), _scan_tile(C, t, ns, L, NSTATE)
        h0 = tl.load(H + ((bi * chunks + k) * DIM + cs[:, None]) * NSTATE + ns[None, :], mask=hmask, other=0.0)
        hs, u = _scan_chunk(h0, x, dt, b, a)
        # g_t's coefficient is the next step's decay: dt read one step ahead (0 past L, where g is 0).
        decay_next = tl.exp(_scan_tile(DT, t + 1, cs, L, DIM)[:, :, None] * a[None, :, :])
        decay, gs = tl.associative_scan((decay_next, dy[:, :, None] * c[:, None, :]), 0, _scan_combine, reverse=True)
        gs = decay * g[None, :, :] + gs
        g = _scan_row(gs, 0, BLOCK_L)
        # h_t = exp(dt_t A) h_{t-1} + u_t: dLoss/du_t = g_t, and dLoss/d(dt_t A) = g_t exp(dt_t A) h_{t-1},
        # which is g_t (h_t - u_t): no shifted copy of the states.
        g_dta = gs * (hs - u)
        g_b = tl.sum(gs * b[:, None, :], 2)                                                # sum_n g_t B_t
        _scan_store(DX, t, cs, L, DIM, g_b * dt + d * dy)
        _scan_store(DDT, t, cs, L, DIM, tl.sum(g_dta * a[None, :, :], 2) + g_b * x)
        _scan_store(DB, t, ns, L, NSTATE, tl.sum(gs * (dt * x)[:, :, None], 1))
        _scan_store(DC, t, ns, L, NSTATE, tl.sum(hs * dy[:, :, None], 1))
        da += tl.sum(g_dta * dt[:, :, None], 0)
        dd += tl.sum(dy * x, 0)
    tl.store(DA + (bi * DIM + cs[:, None]) * NSTATE + ns[None, :], da, mask=hmask)
    tl.store(DD + bi * DIM + cs, dd, mask=cs < DIM)


def _scan_launch(kernel, *tensors, **constexprs):
    """kernel over (batch, channel blocks); tensors start with x, dt, A, B, C, D."""
    (nb, L, dim), N = tensors[0].shape, tensors[2].shape[1]
    block_l, block_d = _scan_blocks(N)
    kernel[(nb, triton.cdiv(dim, block_d))](*tensors, L, dim, N, N_POW2=triton.next_power_of_2(N),
                                            BLOCK_L=block_l, BLOCK_D=block_d, **constexprs)


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D):
        ins = [t.contiguous() for t in (x, dt, A, B, C, D)]
        y, last = torch.empty_like(ins[0]), x.new_empty(x.shape[0], x.shape[2], A.shape[1], dtype=torch.float32)
        _scan_launch(_selective_scan_fwd, *ins, y, last, ALL_STATES=False)
        ctx.save_for_backward(*ins)
        ctx.mark_non_differentiable(last)
        return y, last

    @staticmethod
    def backward(ctx, dy, _):
        x, dt, A, B, C, D = ins = ctx.saved_tensors
        (nb, L, dim), N = x.shape, A.shape[1]
        (block_l, block_d), f32 = _scan_blocks(N), dict(device=x.device, dtype=torch.float32)
        states = torch.empty(nb, triton.cdiv(L, block_l), dim, N, **f32)     # for this backward only
        _scan_launch(_selective_scan_fwd, *ins, x, states, ALL_STATES=True)
        dx, ddt = torch.empty_like(x), torch.empty_like(dt)
        dA, dD = torch.empty(nb, dim, N, **f32), torch.empty(nb, dim, **f32)
        dB, dC = (torch.empty(nb, triton.cdiv(dim, block_d), L, N, **f32) for _ in range(2))
        _scan_launch(_selective_scan_bwd, *ins, dy.contiguous(), states, dx, ddt, dA, dB, dC, dD)
        return dx, ddt, dA.sum(0).to(A.dtype), dB.sum(1).to(B.dtype), dC.sum(1).to(C.dtype), dD.sum(0).to(D.dtype)


def selective_scan(x, dt, A, B, C, D, return_last_state=False):
    """Mamba's selective scan, shapes as selective_scan_ref: y (batch, L, d) in x's dtype, and with
    return_last_state also h_L (batch, d, N) in fp32, for a decoding cache. Differentiable in x, dt,
    A, B, C and D; on the Triton path h_L is not (no gradient flows back through it)."""
    N = A.shape[-1]
    if (x.ndim != 3 or dt.shape != x.shape or A.shape != (x.shape[2], N) or B.shape != (*x.shape[:2], N)
            or C.shape != B.shape or D.shape != x.shape[2:]):
        raise ValueError(f"selective_scan: x {tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}, C {tuple(C.shape)}, D {tuple(D.shape)}; want x and dt (batch, L, d), "
                         "A (d, N), B and C (batch, L, N), D (d,)")
    if not use_triton(x):
        return selective_scan_ref(x, dt, A, B, C, D, return_last_state)
    y, last = _SelectiveScan.apply(x, dt, A, B, C, D)
    return (y, last) if return_last_state else y
