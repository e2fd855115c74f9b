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
    # A scalar head (d_model -> 1) on the final norm's output, beside the LM head: the score of
    # a reward model, or PPO's value head (align.py). It starts at zero: no preference at first.
    value_head: bool = False
    # muP (Yang et al. 2022, Tensor Programs V): hyperparameters tuned at width mup_base_width
    # transfer to width d_model. With m = d_model / mup_base_width, for Adam (their Table 8):
    #   hidden matrices        init std / sqrt(m)  (variance 1/fan_in)    lr / m   (train.py)
    #   embedding, vectors     unchanged                                   lr unchanged
    #   output logits          x 1/m  (the head's input is scaled)         lr unchanged
    #   attention logits       q.k / (sqrt(d_head) sqrt(m)) = sqrt(d_base) q.k / d_head when the
    #                          head count is fixed: muP's 1/d_head instead of 1/sqrt(d_head)
    # At m = 1 every rule is the identity: the standard model, exactly.
    mup: bool = False
    mup_base_width: int = 256
    # Mixture-of-Experts: moe_experts > 0 swaps the MLP of layers i with (i + 1) % moe_every == 0
    # (Qwen2-MoE's decoder_sparse_step; 1: all, as Mixtral) for moe_experts SwiGLU experts of
    # width moe_d_ff (0: d_ff), moe_top_k of them per token.
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_every: int = 1
    moe_d_ff: int = 0
    moe_shared_experts: int = 0     # experts every token goes through, as one MLP of their width (DeepSeek-MoE)
    moe_capacity_factor: float = 0.0  # 0: dropless; else each expert takes this x tokens x k / E, drops the rest
    moe_aux_loss: float = 1e-2      # Switch load balancing, alpha (Fedus et al. 2021, section 2.2)
    moe_z_loss: float = 1e-3        # router z-loss (ST-MoE, Zoph et al. 2022, section 3.5)
    # Mamba: one letter per layer, "A" attention (+ MLP), "M" a Mamba mixer (+ the layer's MoE,
    # if it has one; no dense MLP: Mamba's expansion is its MLP); spaces are ignored; "": all A.
    block_pattern: str = ""
    ssm_state: int = 16             # N, the state per channel (Gu & Dao 2023)
    ssm_conv: int = 4               # the causal depthwise convolution's width
    ssm_expand: int = 2             # d_inner = ssm_expand * d_model
    ssm_dt_rank: int = 0            # 0: ceil(d_model / 16), Mamba's default

    def is_moe(self, layer):
        return self.moe_experts > 0 and (layer + 1) % self.moe_every == 0

    def mixer(self, layer):
        return (self.block_pattern.replace(" ", "") or "A" * self.n_layers)[layer]

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
        if min(self.moe_experts, self.moe_d_ff, self.ssm_dt_rank) < 0 or min(self.ssm_state, self.ssm_conv,
                                                                             self.ssm_expand) < 1:
            raise ValueError("model.moe_experts, moe_d_ff and ssm_dt_rank must be at least 0; model.ssm_state, "
                             "ssm_conv and ssm_expand at least 1")
        if self.mup_base_width < 1:
            raise ValueError(f"model.mup_base_width={self.mup_base_width} must be at least 1")
        self.moe_d_ff = self.moe_d_ff or self.d_ff
        if self.moe_experts and not (1 <= self.moe_top_k <= self.moe_experts and self.moe_every >= 1):
            raise ValueError(f"model.moe_top_k={self.moe_top_k} must be in 1..moe_experts={self.moe_experts} "
                             f"and model.moe_every={self.moe_every} at least 1")
        pattern = self.block_pattern.replace(" ", "")
        if pattern and (len(pattern) != self.n_layers or set(pattern) - set("AM")):
            raise ValueError(f"model.block_pattern={self.block_pattern!r} must have one letter, A or M, for each of "
                             f"the model.n_layers={self.n_layers} layers")
        self.ssm_dt_rank = self.ssm_dt_rank or math.ceil(self.d_model / 16)
        if not min(self.moe_capacity_factor, self.moe_aux_loss, self.moe_z_loss, self.moe_shared_experts) >= 0:  # NaN
            raise ValueError("model.moe_capacity_factor, moe_aux_loss, moe_z_loss and moe_shared_experts must be "
                             "at least 0")

    @property
    def width_mult(self):
        return self.d_model / self.mup_base_width if self.mup else 1.0

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
        self.q_mult = cfg.width_mult ** -0.5  # muP's attention scale, through the queries: any kernel's 1/sqrt(d)
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
        if self.q_mult != 1.0:
            q = q * self.q_mult
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

    def __init__(self, cfg, d_ff=0):
        super().__init__()
        d_ff = d_ff or cfg.d_ff
        self.gate_proj = nn.Linear(cfg.d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(fused.swiglu(self.gate_proj(x), self.up_proj(x)))


# ----------------------------------------------------------------------------------------
# Mixture-of-Experts (Shazeer et al. 2017; Mixtral, Jiang et al. 2024): a router sends each
# token to top_k of E SwiGLU experts and mixes their outputs by the router's renormalised
# probabilities. Two ways to run the experts, for comparison:
#   capacity (Switch, GShard): each expert takes at most C = factor * tokens * k / E tokens in
#       a padded (E, C, d) buffer, one batched matmul; overflow tokens are dropped (they skip
#       the layer through the residual) and counted;
#   dropless (MegaBlocks, Gale et al. 2023; ScatterMoE, Tan et al. 2024): the tokens sorted
#       by expert, every expert one group of fused.grouped_matmul: no capacity, nothing dropped.

class RouterLoss(torch.autograd.Function):
    """Adds an auxiliary loss to training without returning it: the output is x unchanged and
    backward gives the loss the gradient `scale`, as if it were part of the loss being
    differentiated (Megatron's MoEAuxLossAutoScaler). So it works in any pipeline stage and
    under recomputation; train.py sets scale to the loss's own 1 / micro-batches."""

    @staticmethod
    def forward(ctx, x, loss, scale):
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return x

    @staticmethod
    def backward(ctx, grad):
        loss, = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.scale), None


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        E, d, f = cfg.moe_experts, cfg.d_model, cfg.moe_d_ff
        self.cfg = cfg
        self.router = nn.Linear(d, E, bias=False)
        # Experts stacked, each in nn.Linear's (out, in) layout: one tensor per projection.
        self.gate_proj = nn.Parameter(torch.empty(E, f, d))
        self.up_proj = nn.Parameter(torch.empty(E, f, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, f))
        self.shared = MLP(cfg, cfg.moe_shared_experts * f) if cfg.moe_shared_experts else None
        # Set from outside: parallel.py sums the counts over ranks that share a batch (so the
        # balance loss is the global batch's) and scales for ranks holding slices of one
        # sequence; train.py sets loss_scale and reads and resets stats.
        self.reduce_counts, self.aux_scale, self.loss_scale = (lambda counts: counts), 1.0, 1.0
        self.stats = None
        self.run_experts = self.expert_swiglu  # expert parallelism (parallel.py) sends rows to other ranks first

    def forward(self, x):
        shape, k = x.shape, self.cfg.moe_top_k
        x = x.reshape(-1, shape[-1])                                       # (T, d)
        logits = self.router(x).float()                                    # (T, E)
        probs = logits.softmax(-1)
        weights, experts = probs.topk(k, dim=-1)                           # (T, k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)   # renormalised over the k (Mixtral)
        if self.cfg.moe_capacity_factor:
            y, dropped = self.capacity_experts(x, experts, weights)
        else:
            y, dropped = self.dropless_experts(x, experts, weights), torch.zeros((), device=x.device)
        if self.shared is not None:
            y = y + self.shared(x)
        if torch.is_grad_enabled():
            y = self.add_router_losses(y, logits, probs, experts, dropped)
        return y.view(shape)

    def dropless_experts(self, x, experts, weights):
        k = experts.shape[1]
        order = experts.flatten().argsort(stable=True)                     # (T*k,) choices sorted by expert
        token = order // k
        counts = torch.bincount(experts.flatten(), minlength=self.cfg.moe_experts)
        ys = self.run_experts(x[token], counts) * weights.flatten()[order, None]  # (T*k, d) grouped by expert
        return torch.zeros_like(x).index_add_(0, token, ys)

    def expert_swiglu(self, xs, counts):
        """Rows grouped by expert, counts[e] for expert e, through their experts: one grouped
        matmul per projection."""
        h = fused.swiglu(fused.grouped_matmul(xs, self.gate_proj, counts),
                         fused.grouped_matmul(xs, self.up_proj, counts))
        return fused.grouped_matmul(h, self.down_proj, counts)

    def capacity_experts(self, x, experts, weights):
        (T, k), E = experts.shape, self.cfg.moe_experts
        capacity = math.ceil(self.cfg.moe_capacity_factor * T * k / E)
        expert = experts.t().flatten()               # (k*T,): every token's first choice before any second (GShard)
        token = torch.arange(T, device=x.device).repeat(k)
        onehot = F.one_hot(expert, E)
        slot = (onehot.cumsum(0) * onehot).sum(-1) - 1                     # arrival order within the expert
        keep = slot < capacity
        expert, slot, token = expert[keep], slot[keep], token[keep]
        buf = x.new_zeros(E, capacity, x.shape[1])                         # (E, C, d), zeros where unfilled
        buf[expert, slot] = x[token]
        h = fused.swiglu(buf @ self.gate_proj.transpose(1, 2), buf @ self.up_proj.transpose(1, 2))
        out = (h @ self.down_proj.transpose(1, 2))[expert, slot] * weights.t().flatten()[keep, None]
        return torch.zeros_like(x).index_add_(0, token, out), (~keep).sum()

    def add_router_losses(self, y, logits, probs, experts, dropped):
        """Switch's load balancing, E * sum_i f_i * P_i (f_i: the share of choices that went to
        expert i, P_i: its mean router probability; 1 when balanced, E when collapsed), and the
        router z-loss, mean logsumexp(logits)^2, which keeps router logits small."""
        E = self.cfg.moe_experts
        local = torch.bincount(experts.flatten(), minlength=E).float()
        counts = self.reduce_counts(local.clone())
        balance = E * (counts / counts.sum() * probs.mean(0)).sum()
        z = torch.logsumexp(logits, -1).pow(2).mean()
        loss = (self.cfg.moe_aux_loss * balance + self.cfg.moe_z_loss * z) * self.aux_scale
        stats = torch.cat([torch.stack([balance, z, dropped.float(), balance.new_ones(())]), local]).detach()
        self.stats = stats if self.stats is None else self.stats + stats  # train.py logs and resets them
        return RouterLoss.apply(y, loss, self.loss_scale)


# ----------------------------------------------------------------------------------------
# Mamba (Gu & Dao 2023): a selective state-space layer. Trained in parallel over the sequence
# (fused.selective_scan), run at inference as a recurrence whose state does not grow with
# the context: the convolution's last inputs and one (d_inner, N) state per sequence.

class MambaCache(nn.Module):
    """One Mamba layer's state during generation: the last ssm_conv - 1 inputs of the
    convolution and the scan's state, per row."""

    def __init__(self, batch, cfg, dtype, device):
        super().__init__()
        d_inner = cfg.ssm_expand * cfg.d_model
        self.register_buffer("conv", torch.zeros(batch, d_inner, cfg.ssm_conv - 1, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("ssm", torch.zeros(batch, d_inner, cfg.ssm_state, device=device), persistent=False)


class Mamba(nn.Module):
    """The Mamba mixer (mamba_simple.Mamba; transformers' MambaMixer): in_proj to x and the
    gate z; a causal depthwise conv1d and silu on x; x_proj to (dt, B, C), dt_proj and
    softplus for the step size; the selective scan with A = -exp(A_log) and the D skip; the
    output gated by silu(z); out_proj."""

    def __init__(self, cfg):
        super().__init__()
        d_inner, N, R = cfg.ssm_expand * cfg.d_model, cfg.ssm_state, cfg.ssm_dt_rank
        self.splits = [R, N, N]                                            # x_proj's output: dt, B, C
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, cfg.ssm_conv, groups=d_inner, padding=cfg.ssm_conv - 1)
        self.x_proj = nn.Linear(d_inner, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, d_inner)
        self.A_log = nn.Parameter(torch.empty(d_inner, N))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=False)
        self.cache = None  # a MambaCache while generating (infer.py)

    def forward(self, h, doc_starts=None, pos=None):
        """h (B, L, d_model). While generating, doc_starts (B, 1) says where each left-padded row's
        text starts: padding is zeroed before the convolution and the scan, so it leaves the state
        at zero, as if the row started there."""
        L = h.shape[1]
        x, z = self.in_proj(h).chunk(2, dim=-1)                            # (B, L, d_inner) each
        real = None if doc_starts is None else (pos >= doc_starts)[..., None]  # (B, L, 1)
        if real is not None:
            x = x * real
        if self.cache is not None and L == 1:
            return self.step(x, z)
        conv_in = x.transpose(1, 2)                                        # (B, d_inner, L)
        x = F.silu(self.conv1d(conv_in)[..., :L]).transpose(1, 2)
        if real is not None:
            x = x * real
        dt, B, C = self.x_proj(x).split(self.splits, dim=-1)
        dt = F.softplus(self.dt_proj(dt))
        A = -torch.exp(self.A_log.float())
        if self.cache is None:
            y = fused.selective_scan(x, dt, A, B, C, self.D)
        else:  # a prompt: the parallel scan, keeping its last state and the convolution's last inputs
            y, self.cache.ssm = fused.selective_scan(x, dt, A, B, C, self.D, return_last_state=True)
            k = self.cache.conv.shape[-1]
            self.cache.conv = F.pad(conv_in, (max(0, k - L), 0))[..., -k:].to(self.cache.conv.dtype)
        return self.out_proj(y * F.silu(z))

    def step(self, x, z):
        """One token (B, 1, d_inner) through the recurrence: the convolution over the cached
        inputs, then h = exp(dt A) h + dt B x and y = C.h + D x."""
        window = torch.cat([self.cache.conv, x.transpose(1, 2).to(self.cache.conv.dtype)], dim=-1)  # (B, d_inner, k)
        self.cache.conv = window[..., 1:]
        x = F.silu((window * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)  # (B, d_inner)
        dt, B, C = self.x_proj(x).split(self.splits, dim=-1)
        dt = F.softplus(self.dt_proj(dt)).float()
        A = -torch.exp(self.A_log.float())
        self.cache.ssm = torch.exp(dt[..., None] * A) * self.cache.ssm + (dt[..., None] * B.float()[:, None]
                                                                           * x.float()[..., None])
        y = (self.cache.ssm @ C.float()[..., None])[..., 0] + self.D * x
        return self.out_proj((y.to(x.dtype) * F.silu(z[:, 0]))[:, None])


class Block(nn.Module):
    """Pre-norm residual layer: attention (or a Mamba mixer) and an MLP (or MoE)."""

    def __init__(self, cfg, layer=0):
        super().__init__()
        if cfg.mixer(layer) == "A":
            self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.attn = Attention(cfg)
        else:
            self.mamba_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.mamba = Mamba(cfg)
        if cfg.mixer(layer) == "A" or cfg.is_moe(layer):
            self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.mlp = MoE(cfg) if cfg.is_moe(layer) else MLP(cfg)

    def forward(self, x, cos, sin, doc_starts=None, pos=None):
        if hasattr(self, "attn"):
            x = x + self.attn(self.attn_norm(x), cos, sin, doc_starts, pos)
        else:
            x = x + self.mamba(self.mamba_norm(x), doc_starts, pos)
        return x + self.mlp(self.mlp_norm(x)) if hasattr(self, "mlp") else x


# ----------------------------------------------------------------------------------------
# The decoder

@torch.no_grad()
def init_parameter(name, p, cfg, generator=None):
    """Normal(0, 0.02) everywhere (GPT-2, Llama); the projections that write into the
    residual stream get std / sqrt(2 * n_layers) so its variance stays O(1) with depth
    (GPT-2 paper, section 2.3). Norm weights start at 1. Mamba's own (its reference code):
    A_log = log(1..N) in every channel, D = 1, a zero conv bias, conv weights in PyTorch's
    default range, and dt_proj's bias the inverse softplus of a step size log-uniform in
    [1e-3, 0.1], its weight uniform within dt_rank^-1/2."""
    if name.endswith("A_log"):
        return p.copy_(torch.log(torch.arange(1, p.shape[1] + 1, dtype=p.dtype, device=p.device)).expand_as(p))
    if name.endswith("dt_proj.bias"):
        dt = torch.exp(torch.rand(p.shape, generator=generator, device=p.device) * math.log(100) + math.log(1e-3))
        return p.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) = dt
    if name.endswith("dt_proj.weight"):
        return nn.init.uniform_(p, -cfg.ssm_dt_rank ** -0.5, cfg.ssm_dt_rank ** -0.5, generator=generator)
    if name.endswith("conv1d.weight"):
        return nn.init.uniform_(p, -cfg.ssm_conv ** -0.5, cfg.ssm_conv ** -0.5, generator=generator)
    if name.endswith("conv1d.bias"):
        return nn.init.zeros_(p)
    if p.dim() == 1:
        return nn.init.ones_(p)
    if name == "value_head.weight":
        return nn.init.zeros_(p)
    std = cfg.init_std
    if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj", "out_proj.weight")):  # "down_proj": experts
        std /= math.sqrt(2 * cfg.n_layers)
    if name not in ("embed.weight", "lm_head.weight"):  # a hidden matrix: muP's variance 1/fan_in
        std /= math.sqrt(cfg.width_mult)
    return nn.init.normal_(p, 0.0, std, generator=generator)


class LMHead(nn.Linear):
    """The output projection to the vocabulary; given targets, it returns the mean loss instead
    of the logits. On the Triton path the projection and the loss run fused over row chunks,
    so the (tokens, vocab) logits never exist at once. Rows past vocab (padding) are left out.
    parallel.py swaps in a vocab-parallel head with the same weight name."""

    def __init__(self, d_model, padded_vocab, vocab):
        super().__init__(d_model, padded_vocab, bias=False)
        self.vocab = vocab

    def forward(self, h, targets=None, ignore_index=-100, per_token=False):
        weight = self.weight[:self.vocab]
        if targets is None:
            return F.linear(h, weight)                                     # (B, S, vocab)
        if per_token:  # each target's log-probability, 0 where ignored (alignment's sums)
            logits = F.linear(h, weight).float()
            return -F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=ignore_index, reduction="none")
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
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = LMHead(cfg.d_model, cfg.padded_vocab, cfg.vocab_size)
        self.value_head = nn.Linear(cfg.d_model, 1, bias=False) if cfg.value_head else None
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

    def forward(self, x, targets=None, pos=None, doc_starts=None, ignore_index=-100, per_token=False, values=False):
        """input_ids (B, S) -> logits (B, S, vocab), or the mean loss when targets are given.
        per_token: each target's log-probability (B, S) instead of the mean loss. values: also
        (or, given values="only", just) the value head's (B, S) scores, as (lm output, values).

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
        h = self.norm(h)
        scores = self.value_head(h).squeeze(-1).float() if values else None
        if values == "only":
            return scores
        out = self.lm_head(h / self.cfg.width_mult if self.cfg.mup else h, targets, ignore_index, per_token)
        return (out, scores) if values else out

    def num_params(self, embedding=True):
        n = sum(p.numel() for p in self.parameters())  # a tied weight is counted once
        if not embedding and not self.cfg.tie_embeddings:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per weight used in a matmul (2 forward, 4 backward;
        Kaplan et al. 2020) plus attention's scores and weighted sum, 6 * 2 * L * S * d_attn
        (PaLM, appendix B). The embedding lookup is not a matmul; a tied head still is; a token
        uses top_k of a MoE layer's experts; Mamba's scan is left out, like the norms."""
        c = self.cfg
        matmul_params = self.num_params() - (0 if c.tie_embeddings else self.embed.weight.numel())
        matmul_params -= sum(3 * c.d_model * c.moe_d_ff * (c.moe_experts - c.moe_top_k)
                             for i in range(c.n_layers) if c.is_moe(i))
        attention_layers = sum(c.mixer(i) == "A" for i in range(c.n_layers))  # a Mamba layer's scan: O(d N) per token
        return 6 * matmul_params + 12 * attention_layers * seq_len * c.n_heads * c.head_dim
