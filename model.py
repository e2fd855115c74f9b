"""model.py — a Llama-style decoder in plain single-device PyTorch.

token embedding -> n_layers x [RMSNorm -> attention (RoPE, grouped-query heads)
                               + residual, RMSNorm -> SwiGLU MLP + residual]
                -> RMSNorm -> LM head (tied to the embedding or not)

Reading this file alone teaches the architecture: it knows nothing about process groups.
parallel.py applies tensor/sequence/pipeline/context parallelism from outside by swapping
submodules and the attention function. The last section converts to and from the
Hugging Face Llama (and, with QK-norm, Qwen3) format with transformers' key names.
"""
import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

import kernels


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


# ----------------------------------------------------------------------------------------
# Building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)


def rope_tables(head_dim, max_seq_len, theta):
    """cos and sin of position * frequency, (max_seq_len, head_dim), in fp32.

    RoPE (Su et al. 2021) in the rotate-half layout of transformers: the pair rotated
    together is (x[i], x[i + head_dim/2]), so Llama checkpoints need no permutation."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)  # (S, D/2)
    angles = torch.cat([angles, angles], dim=-1)                         # (S, D)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x (B, H, S, D); cos, sin (S, D) for the positions of x's sequence."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


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
        self.attn_fn = kernels.attention

    def forward(self, x, cos, sin):
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
        y = self.attn_fn(q, k, v, causal=True)                             # (B, Hq, S, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))            # (B, S, d_model)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
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


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def to_empty(self, *, device, recurse=True):
        """nn.Module.to_empty for a model built on the meta device (train.build_model): also
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

    def rope(self, pos):
        """cos, sin tables for positions pos (S,) — a plain arange unless the sequence is
        split into chunks (context parallel) or continues a cache (generation). Positions
        are not range-checked here: reading pos.max() would synchronise with the GPU on
        every step and break torch.compile's graph. Callers check lengths instead
        (forward below, and train.py's config check of data.seq_len)."""
        return self.rope_cos[pos], self.rope_sin[pos]

    def forward(self, input_ids, targets=None, pos=None, ignore_index=-100):
        """input_ids (B, S) -> logits (B, S, vocab), or the mean loss when targets are given."""
        if pos is None:
            if input_ids.shape[1] > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {input_ids.shape[1]} tokens is longer than "
                                 f"model.max_seq_len={self.cfg.max_seq_len}")
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rope(pos)
        h = self.embed(input_ids)                                          # (B, S, d_model)
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = self.norm(h)
        if targets is None:
            return self.lm_head(h)
        return self.loss(h, targets, ignore_index)

    def loss(self, h, targets, ignore_index=-100):
        """Mean cross-entropy of the LM head on final hidden states h (B, S, d_model).
        On the Triton path the head and the loss run fused over row chunks, so the
        (tokens, vocab) logits never exist at once; otherwise logits, then the loss."""
        h, targets = h.flatten(0, 1), targets.flatten()                   # (B*S, d_model), (B*S,)
        if kernels.use_triton(h):
            return kernels.linear_cross_entropy(h, self.lm_head.weight, targets, ignore_index)
        return kernels.cross_entropy(self.lm_head(h), targets, ignore_index)

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


# ----------------------------------------------------------------------------------------
# Hugging Face format: config.json + model.safetensors with transformers' key names.
# Our names differ from transformers' only by these patterns ({i} is a layer index).

HF_NAMES = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.attn.{w}.weight", "model.layers.{i}.self_attn.{w}.weight"),
    ("layers.{i}.mlp.{w}.weight", "model.layers.{i}.mlp.{w}.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


def _rename(name, table, reverse=False):
    for ours, theirs in table:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        pattern = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{w\}", r"(?P<w>\w+)")
        m = re.fullmatch(pattern, name)
        if m:
            return dst.format(**m.groupdict())
    raise KeyError(name)


def save_hf(model, out_dir, dtype=torch.float32):
    """Write config.json and model.safetensors that transformers' LlamaForCausalLM (or
    Qwen3ForCausalLM when the model uses QK-norm) loads with equal logits."""
    from safetensors.torch import save_file
    c = model.cfg
    arch, model_type = ("Qwen3ForCausalLM", "qwen3") if c.qk_norm else ("LlamaForCausalLM", "llama")
    config = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
        # transformers < 5 reads rope_theta, >= 5 reads rope_parameters: write both.
        "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "initializer_range": c.init_std, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    # A tied head is the embedding: store it once, as transformers does.
    tensors = {_rename(n, HF_NAMES): p.detach().to(dtype).contiguous().cpu()
               for n, p in model.named_parameters()}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def _read_hf_tensors(hf_dir):
    from safetensors.torch import load_file
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):  # a sharded checkpoint: model-00001-of-0000N.safetensors ...
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(hf_dir, name)))
    return tensors


def config_from_hf(hf):
    """ModelConfig from a transformers config.json dict (Llama or Qwen3)."""
    where = "config.json"
    if hf.get("model_type") not in ("llama", "qwen3"):
        raise ValueError(f"{where}: model_type {hf.get('model_type')!r} is not supported (llama, qwen3)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{where}: RoPE scaling {rope.get('rope_type')!r} is not supported")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"{where}: only silu activations without biases are supported")
    n_heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
        qk_norm=hf["model_type"] == "qwen3", init_std=hf.get("initializer_range", 0.02))


def load_hf(hf_dir, dtype=torch.float32):
    """A transformers Llama/Qwen3 checkpoint directory -> Transformer with equal logits."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = config_from_hf(json.load(f))
    model = Transformer(cfg)
    tensors = {}
    for name, t in _read_hf_tensors(hf_dir).items():
        if "rotary_emb" in name:  # some old exports store RoPE's inv_freq; we compute it
            continue
        try:
            tensors[_rename(name, HF_NAMES, reverse=True)] = t
        except KeyError:
            raise KeyError(f"{hf_dir}: tensor {name!r} has no counterpart in model.py") from None
    params = dict(model.named_parameters())
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some exports store the tied head twice
    for what, names in (("missing", set(params) - set(tensors)), ("unexpected", set(tensors) - set(params))):
        if names:
            raise KeyError(f"{hf_dir}: {what} tensors {sorted(names)[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise ValueError(f"{hf_dir}: {name} has shape {tuple(tensors[name].shape)}, "
                                 f"config.json implies {tuple(p.shape)}")
            p.copy_(tensors[name])
    return model.to(dtype)
