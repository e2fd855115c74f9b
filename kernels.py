"""kernels.py — the fused ops the model calls, each with a torch reference.

Every op has three parts: a torch reference (the source of truth for tests), a Triton
path, and a dispatcher that model.py calls. The dispatcher picks:

    backend "auto"   Triton for CUDA tensors, the torch reference otherwise
    backend "torch"  always the reference (`[train] kernels = "torch"` in a config)
    backend "triton" always Triton; on a CPU this needs TRITON_INTERPRET=1 set before
                     triton is imported (the tests do this in conftest.py)

kernels.py knows nothing about models: shapes in, shapes out.
"""
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # macOS, or a CPU-only install without triton
    HAVE_TRITON = False

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


# ----------------------------------------------------------------------------------------
# Attention

def attention_ref(q, k, v, causal=True, scale=None):
    """q (B, Hq, S, D), k and v (B, Hkv, S, D) with Hq a multiple of Hkv -> (B, Hq, S, D)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def attention(q, k, v, causal=True, scale=None):
    return attention_ref(q, k, v, causal, scale)


# ----------------------------------------------------------------------------------------
# RMSNorm

def rms_norm_ref(x, weight, eps):
    # Statistics in fp32, then back to x's dtype before the weight: the order of
    # transformers' LlamaRMSNorm, so bf16 outputs match it bit for bit.
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def rms_norm(x, weight, eps):
    return rms_norm_ref(x, weight, eps)


# ----------------------------------------------------------------------------------------
# SwiGLU

def swiglu_ref(gate, up):
    return F.silu(gate) * up


def swiglu(gate, up):
    return swiglu_ref(gate, up)


# ----------------------------------------------------------------------------------------
# Cross-entropy

def cross_entropy_ref(logits, targets, ignore_index=-100, z_loss=0.0):
    """Mean cross-entropy over targets != ignore_index, plus z_loss * mean(logsumexp^2)
    (PaLM, section 5: keeps the softmax normaliser near 1)."""
    logits = logits.float()
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index)
    if z_loss:
        keep = targets != ignore_index
        loss = loss + z_loss * torch.logsumexp(logits[keep], dim=-1).pow(2).mean()
    return loss


def cross_entropy(logits, targets, ignore_index=-100, z_loss=0.0):
    return cross_entropy_ref(logits, targets, ignore_index, z_loss)
