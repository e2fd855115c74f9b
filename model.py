"""model.py — a Llama-style decoder in plain single-device PyTorch.

token embedding -> n_layers x [RMSNorm -> attention (RoPE, grouped-query heads)
                               + residual, RMSNorm -> SwiGLU MLP + residual]
                -> RMSNorm -> LM head (tied to the embedding or not)

Reading this file alone teaches the architecture: it knows nothing about process groups.
parallel.py applies tensor/sequence/pipeline/context parallelism from outside by swapping
submodules (parallel linears, norms, embedding and head) and the attention function, and
keeps only a pipeline stage's layers. Weights get in and out through checkpoint.py, which
builds this model on the meta device and fills it (its own checkpoints and the Hugging Face
Llama / Qwen3 format).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fused


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4        # grouped-query attention: n_heads / n_kv_heads queries share a K/V head
    head_dim: int = 0          # 0: d_model // n_heads
    d_ff: int = 0              # 0: Llama's rule, 2/3 * 4 * d_model rounded up to a multiple of 64
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qk_norm: bool = False      # RMSNorm on each query/key head before RoPE (OLMo 2, Qwen3)
    init_std: float = 0.02     # GPT-2 / Llama initialisation
    # Embedding and head rows rounded up to a multiple of this, so that any tensor-parallel
    # width divides them whatever the tokenizer (Megatron pads to 128 x tp); the padded ids
    # are never predicted: the head's logits stop at vocab_size.
    vocab_multiple: int = 1

    def __post_init__(self):
        if self.head_dim == 0 and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                             "set model.head_dim explicitly")
        self.head_dim = self.head_dim or self.d_model // self.n_heads
        self.d_ff = self.d_ff or 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even for RoPE")

    @property
    def padded_vocab(self):
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


# ----------------------------------------------------------------------------------------
# Building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return fused.rms_norm(x, self.weight, self.eps)


def rope_tables(head_dim, max_seq_len, theta):
    """cos and sin of position * frequency, (max_seq_len, head_dim), in fp32.

    RoPE (Su et al. 2021) in the rotate-half layout of transformers: the pair rotated
    together is (x[i], x[i + head_dim/2]), so Llama checkpoints need no permutation."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)  # (S, D/2)
    angles = torch.cat([angles, angles], dim=-1)                         # (S, D)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x (B, H, S, D); cos, sin (S, D) for the positions of x's sequence, or (B, 1, S, D) when
    positions differ by row (packed documents)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache(nn.Module):
    """One attention layer's keys and values during generation, preallocated (gpt-fast's):
    update writes this step's at their positions in place and returns the whole buffers, so
    every decode step has the same shapes, which torch.compile and CUDA graphs need."""

    def __init__(self, batch, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k, v):
        """pos (S,): the cache positions of k and v (B, Hkv, S, D)."""
        self.k_cache[:, :, pos] = k
        self.v_cache[:, :, pos] = v
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        # The one place attention is computed; context parallelism swaps in ring attention.
        self.attn_fn = fused.attention
        self.cache = None  # a KVCache while generating (infer.py)

    def forward(self, x, cos, sin, doc_starts=None, pos=None):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # Shapes come from the projections, not from x: under tensor parallelism a rank holds
        # fewer heads (-1 below), and under sequence parallelism x holds a slice of the
        # sequence that is gathered before the projections.
        B, S = q.shape[:2]
        q = q.view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, Hq, S, D)
        k = k.view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = v.view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is None:
            y = self.attn_fn(q, k, v, causal=True, doc_starts=doc_starts)  # (B, Hq, S, D)
        else:  # generation: the queries at pos see every key written up to theirs, in their row's text
            k, v = self.cache.update(pos, k, v)                            # (B, Hkv, T, D)
            keys = torch.arange(k.shape[2], device=k.device)
            mask = keys <= pos[:, None]                                    # (S, T)
            if doc_starts is not None:  # a left-padding position sees itself: no row of NaN to spread
                mask = (mask & (keys >= torch.minimum(doc_starts, pos)[..., None]))[:, None]  # (B, 1, S, T)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                               enable_gqa=q.shape[1] != k.shape[1])
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))            # (B, S, d_model)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(fused.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, doc_starts=None, pos=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, doc_starts, pos)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------------------
# The decoder

@torch.no_grad()
def init_parameter(name, p, cfg, generator=None):
    """Normal(0, 0.02) everywhere (GPT-2, Llama); the projections that write into the
    residual stream get std / sqrt(2 * n_layers) so its variance stays O(1) with depth
    (GPT-2 paper, section 2.3). Norm weights start at 1."""
    if p.dim() == 1:
        return nn.init.ones_(p)
    std = cfg.init_std
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std /= math.sqrt(2 * cfg.n_layers)
    return nn.init.normal_(p, 0.0, std, generator=generator)


class LMHead(nn.Linear):
    """The output projection to the vocabulary; given targets, it returns the mean loss instead
    of the logits. On the Triton path the projection and the loss run fused over row chunks,
    so the (tokens, vocab) logits never exist at once. Rows past vocab (padding) are left out.
    parallel.py swaps in a vocab-parallel head with the same weight name."""

    def __init__(self, d_model, padded_vocab, vocab):
        super().__init__(d_model, padded_vocab, bias=False)
        self.vocab = vocab

    def forward(self, h, targets=None, ignore_index=-100):
        weight = self.weight[:self.vocab]
        if targets is None:
            return F.linear(h, weight)                                     # (B, S, vocab)
        h, targets = h.flatten(0, 1), targets.flatten()                   # (B*S, d_model), (B*S,)
        if fused.use_triton(h):
            return fused.linear_cross_entropy(h, weight, targets, ignore_index)
        return fused.cross_entropy(F.linear(h, weight), targets, ignore_index)


def document_starts(ids, bos_id):
    """(B, S): where the document of each position starts, the last <|bos|> at or before it
    (0 before the first): what masks attention and restarts positions in packed sequences."""
    at = torch.arange(ids.shape[1], device=ids.device)
    return torch.where(ids == bos_id, at, 0).cummax(1).values


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = LMHead(cfg.d_model, cfg.padded_vocab, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Activation recomputation (Chen et al. 2016): keep each block's input only and run the
        # block again in backward. Memory for compute; `[parallel] recompute = true` sets it.
        self.recompute = False
        self.init_weights()

    def to_empty(self, *, device, recurse=True):
        """nn.Module.to_empty for a model built on the meta device (checkpoint.build_model): also
        ties the head again (to_empty gives each module its own tensor) and refills the RoPE
        tables, which are computed, never loaded. Pipeline stages may lack embed or head."""
        super().to_empty(device=device, recurse=recurse)
        if self.cfg.tie_embeddings and self.embed is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed.weight
        self.rope_cos, self.rope_sin = (t.to(device) for t in rope_tables(self.cfg.head_dim, self.cfg.max_seq_len,
                                                                          self.cfg.rope_theta))
        return self

    @torch.no_grad()
    def init_weights(self):
        for name, p in self.named_parameters():
            init_parameter(name, p, self.cfg)

    def forward(self, x, targets=None, pos=None, doc_starts=None, ignore_index=-100):
        """input_ids (B, S) -> logits (B, S, vocab), or the mean loss when targets are given.

        pos (S,): the tokens' positions, for RoPE; an arange unless the sequence is cut into
        chunks (context parallel) or continues a cache (generation). They are not range-checked
        here: reading pos.max() would synchronise with the GPU on every step and break
        torch.compile's graph, so callers check lengths (below, and the config's data.seq_len).
        doc_starts (B, S): packed documents (document_starts): attention stays inside each,
        and positions restart at its start, so a document sees what it would see alone.
        A pipeline stage (parallel.py) lacks the embedding, the head or both: it takes hidden
        states (B, S, d_model) in, or gives them out."""
        if pos is None:
            if x.shape[1] > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {x.shape[1]} tokens is longer than "
                                 f"model.max_seq_len={self.cfg.max_seq_len}")
            pos = torch.arange(x.shape[1], device=x.device)
        rope_pos = pos - doc_starts if doc_starts is not None else pos     # (B, S) or (S,)
        cos, sin = self.rope_cos[rope_pos], self.rope_sin[rope_pos]        # (S or B, S, head_dim)
        if rope_pos.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]                          # (B, 1, S, head_dim)
        h = self.embed(x) if self.embed is not None else x                 # (B, S, d_model)
        layers = self.layers.values() if isinstance(self.layers, nn.ModuleDict) else self.layers
        for layer in layers:
            if self.recompute and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, doc_starts, pos, use_reentrant=False)
            else:
                h = layer(h, cos, sin, doc_starts, pos)
        if self.lm_head is None:
            return h
        return self.lm_head(self.norm(h), targets, ignore_index)

    def num_params(self, embedding=True):
        n = sum(p.numel() for p in self.parameters())  # a tied weight is counted once
        if not embedding and not self.cfg.tie_embeddings:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per weight used in a matmul (2 forward, 4 backward;
        Kaplan et al. 2020) plus attention's scores and weighted sum, 6 * 2 * L * S * d_attn
        (PaLM, appendix B). The embedding lookup is not a matmul; a tied head still is."""
        c = self.cfg
        matmul_params = self.num_params() - (0 if c.tie_embeddings else self.embed.weight.numel())
        return 6 * matmul_params + 12 * c.n_layers * seq_len * c.n_heads * c.head_dim
