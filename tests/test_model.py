import math

import pytest
import torch

import checkpoint
import model
from model import ModelConfig, Transformer


def tiny(**kw):
    base = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def test_causal_future_tokens_never_change_earlier_logits():
    torch.manual_seed(0)
    m = Transformer(tiny())
    x = torch.randint(0, 128, (2, 24))
    y = x.clone()
    y[:, 13:] = torch.randint(0, 128, (2, 11))
    a, b = m(x), m(y)
    assert torch.equal(a[:, :13], b[:, :13])
    assert not torch.allclose(a[:, 13:], b[:, 13:])


def mha_reference(q, k, v):
    """Multi-head causal attention written out: softmax(q k^T / sqrt(d) + mask) v."""
    S, D = q.shape[-2:]
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def test_attention_without_grouping_is_plain_multi_head_attention():
    torch.manual_seed(0)
    m = Transformer(tiny(n_kv_heads=4))
    attn = m.layers[0].attn
    x = torch.randn(2, 10, 64)
    cos, sin = m.rope_cos[:10], m.rope_sin[:10]
    B, S = 2, 10
    q = attn.q_proj(x).view(B, S, 4, 16).transpose(1, 2)
    k = attn.k_proj(x).view(B, S, 4, 16).transpose(1, 2)
    v = attn.v_proj(x).view(B, S, 4, 16).transpose(1, 2)
    q, k = model.apply_rope(q, cos, sin), model.apply_rope(k, cos, sin)
    want = attn.o_proj(mha_reference(q, k, v).transpose(1, 2).reshape(B, S, 64))
    torch.testing.assert_close(attn(x, cos, sin), want, atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_equals_repeated_kv_heads():
    """GQA with n_kv_heads = n_heads / 2 equals multi-head attention whose K/V heads are the
    shared ones repeated — the definition of grouping."""
    torch.manual_seed(0)
    gqa = Transformer(tiny(n_kv_heads=2))
    mha = Transformer(tiny(n_kv_heads=4))
    with torch.no_grad():
        for name, p in gqa.named_parameters():
            if "k_proj" not in name and "v_proj" not in name:
                mha.get_parameter(name).copy_(p)
        for g, m in zip(gqa.layers, mha.layers):
            for name in ("k_proj", "v_proj"):
                w = getattr(g.attn, name).weight.view(2, 16, 64)  # (kv_heads, head_dim, d)
                getattr(m.attn, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(64, 64))
    x = torch.randint(0, 128, (2, 16))
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_rope_equals_complex_rotation():
    """Rotate-half RoPE equals multiplying (x_i, x_{i+D/2}) as a complex number by e^{i m theta_i}."""
    cos, sin = model.rope_tables(16, 32, 10000.0)
    x = torch.randn(1, 1, 32, 16)
    z = torch.complex(x[..., :8], x[..., 8:])
    freqs = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    rotated = z * torch.polar(torch.ones(32, 8), torch.outer(torch.arange(32).float(), freqs))
    want = torch.cat([rotated.real, rotated.imag], -1)
    torch.testing.assert_close(model.apply_rope(x, cos, sin), want, atol=1e-5, rtol=1e-5)


def test_loss_is_mean_cross_entropy_with_ignore_index():
    torch.manual_seed(0)
    m = Transformer(tiny())
    x = torch.randint(0, 128, (2, 12))
    y = torch.randint(0, 128, (2, 12))
    y[0, :5] = -100
    logits = m(x).double()
    # -log softmax of the target, written out: log sum exp(logits) - logit of the target
    nll = logits.exp().sum(-1).log() - logits.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    want = nll[y != -100].mean()
    torch.testing.assert_close(m(x, y).double(), want, atol=1e-5, rtol=1e-5)


def test_overfits_one_batch():
    torch.manual_seed(0)
    m = Transformer(tiny())
    x = torch.randint(0, 128, (4, 32))
    y = torch.roll(x, -1, 1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(150):
        loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    m = Transformer(tiny(n_layers=8, d_model=256, n_heads=4, vocab_size=256))
    assert abs(m.layers[0].attn.q_proj.weight.std().item() - 0.02) < 1e-3
    assert abs(m.layers[0].mlp.down_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 5e-4
    assert torch.equal(m.norm.weight, torch.ones(256))


def test_param_count_and_flops_closed_form():
    c = tiny(d_ff=96, tie_embeddings=False)
    m = Transformer(c)
    d, v, kv = 64, 128, 2 * 16
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * 96 + 2 * d
    assert m.num_params() == 2 * v * d + 2 * per_layer + d
    # 6 per parameter but the embedding's (a lookup), + 12 * layers * seq * (heads * head_dim)
    assert m.flops_per_token(32) == 6 * (2 * per_layer + d + v * d) + 12 * 2 * 32 * 64
    tied = Transformer(tiny(d_ff=96, tie_embeddings=True))
    assert tied.num_params() == m.num_params() - v * d
    assert tied.flops_per_token(32) == m.flops_per_token(32)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(n_heads=6, n_kv_heads=4, d_model=96)


def test_sequence_longer_than_the_rope_tables_is_refused():
    model = Transformer(ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, max_seq_len=8))
    model(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="sequence of 9 tokens is longer than model.max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


# ----------------------------------------------------------------------------------------
# Hugging Face parity (transformers is a test-only dependency)

HF_CASES = {"gqa_untied": dict(n_kv_heads=2, tie_embeddings=False),
            "mha_tied": dict(n_kv_heads=4, tie_embeddings=True),
            "qk_norm_qwen3": dict(n_kv_heads=2, qk_norm=True)}


@pytest.mark.parametrize("case", HF_CASES)
def test_export_loads_in_transformers_with_equal_logits(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = Transformer(tiny(rope_theta=5000.0, norm_eps=1e-6, **HF_CASES[case]))
    checkpoint.save_hf(ours, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    want = "Qwen3ForCausalLM" if "qwen3" in case else "LlamaForCausalLM"
    assert type(theirs).__name__ == want
    x = torch.randint(0, 128, (2, 33))
    assert (theirs(x).logits - ours(x)).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", HF_CASES)
def test_transformers_checkpoint_loads_here_with_equal_logits(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    kw = HF_CASES[case]
    cls = transformers.Qwen3Config if kw.get("qk_norm") else transformers.LlamaConfig
    hf_cfg = cls(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=kw["n_kv_heads"], max_position_embeddings=64,
                 rope_theta=20000.0, tie_word_embeddings=kw.get("tie_embeddings", False))
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")
    with torch.no_grad():  # transformers initialises norms to 1: randomise them to test their mapping
        for n, p in theirs.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    theirs.save_pretrained(tmp_path)
    ours = checkpoint.load_hf(tmp_path)
    assert ours.cfg.rope_theta == 20000.0 and ours.cfg.d_ff == 160
    x = torch.randint(0, 128, (2, 33))
    assert (theirs(x).logits - ours(x)).abs().max().item() < 1e-4


def test_load_hf_rejects_unsupported_config(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="config.json: model_type 'gpt2'"):
        checkpoint.load_hf(tmp_path)


def test_packed_documents_get_the_logits_they_would_get_alone():
    """doc_starts from <|bos|> (id 0 here): attention stays in each document and RoPE
    positions restart, so each document's logits equal its own forward's; without it, the
    later documents see the earlier ones."""
    torch.manual_seed(0)
    m = Transformer(tiny(qk_norm=True))
    docs = [torch.randint(1, 128, (n,)) for n in (5, 1, 17, 9)]
    for d in docs:
        d[0] = 0
    packed = torch.cat(docs)[None]
    got = m(packed, doc_starts=model.document_starts(packed, 0))
    at = 0
    for d in docs:
        torch.testing.assert_close(got[0, at:at + len(d)], m(d[None])[0], atol=1e-5, rtol=1e-5)
        at += len(d)
    assert not torch.allclose(m(packed)[0, 5:], got[0, 5:], atol=1e-3)
