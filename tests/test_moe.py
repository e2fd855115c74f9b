"""Mixture-of-Experts: the router and its losses against closed forms, both ways of running the
experts against a per-token loop, capacity drops counted, Mixtral against transformers both
ways, and the balance loss keeping experts in use while training."""
import math

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import infer
from conftest import rows_alone
from model import ModelConfig, MoE, Transformer

CFG = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, moe_experts=4,
           moe_top_k=2, moe_d_ff=24)


def moe(seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    layer = MoE(ModelConfig(**{**CFG, **overrides})).to(dtype)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    return layer


def per_token(layer, x):
    """The layer token by token: softmax over all experts, the top k renormalised, each chosen
    expert's SwiGLU weighted by it; plus the shared expert."""
    out = []
    for t in x:
        probs = torch.softmax(layer.router.weight @ t, -1)
        top = probs.topk(layer.cfg.moe_top_k).indices
        y = sum(probs[e] / probs[top].sum() * expert(layer, e, t) for e in top)
        out.append(y + (layer.shared(t) if layer.shared is not None else 0))
    return torch.stack(out)


def test_router_losses_equal_their_closed_forms():
    """Four tokens, two experts, top-1: logits (0, ln 3) three times and (ln 3, 0) once. Shares
    f = (1/4, 3/4), mean probabilities P = (3/8, 5/8): balance 2 (f.P) = 9/8; every row's
    logsumexp is ln 4: z-loss (ln 4)^2. Their gradient is added to the router's as if the
    weighted sum were part of the loss."""
    layer = moe(moe_experts=2, moe_top_k=1, d_model=2, n_heads=1, n_kv_heads=1, moe_aux_loss=0.1, moe_z_loss=0.01)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    x = torch.tensor([[0.0, math.log(3)]] * 3 + [[math.log(3), 0.0]], dtype=torch.float64).view(1, 4, 2)
    y = layer(x)
    balance, z, dropped, n = layer.stats[:4].tolist()
    assert balance == pytest.approx(9 / 8) and z == pytest.approx(math.log(4) ** 2) and (dropped, n) == (0, 1)
    assert layer.stats[4:].tolist() == [1, 3]
    (y * 0).sum().backward()   # only the router losses reach the router
    w = torch.eye(2, dtype=torch.float64, requires_grad=True)
    logits = x.view(4, 2) @ w.T
    f = torch.tensor([0.25, 0.75], dtype=torch.float64)
    want = 0.1 * 2 * (f * logits.softmax(-1).mean(0)).sum() + 0.01 * torch.logsumexp(logits, -1).pow(2).mean()
    want.backward()
    torch.testing.assert_close(layer.router.weight.grad, w.grad)


@pytest.mark.parametrize("shared", [False, True])
def test_dropless_experts_equal_a_per_token_loop(shared):
    """Output and every gradient (router losses off: checked above); uneven expert loads, an
    expert left empty."""
    layer = moe(moe_shared_experts=int(shared), moe_aux_loss=0.0, moe_z_loss=0.0)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    x[..., 0] = x[..., 0].abs() + 1
    x.requires_grad_()
    with torch.no_grad():  # keep expert 3 out of every token's top 2
        layer.router.weight[3] = 0.0
        layer.router.weight[3, 0] = -100.0
    y = layer(x)
    assert layer.stats[4 + 3] == 0
    want = per_token(layer, x.view(-1, 16)).view_as(y)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)  # router probabilities are fp32, as transformers'

    grads = torch.autograd.grad(y.pow(2).sum(), [x, *layer.parameters()])
    want_grads = torch.autograd.grad(want.pow(2).sum(), [x, *layer.parameters()])
    for (name, _), g, w in zip([("x", 0), *layer.named_parameters()], grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)


def expert(layer, e, t):
    return layer.down_proj[e] @ (F.silu(layer.gate_proj[e] @ t) * (layer.up_proj[e] @ t))


def test_capacity_mode_drops_the_choices_past_capacity_and_counts_them():
    """Eight tokens, top-2 of 4 experts, capacity 1.0 x 8 x 2 / 4 = 4 per expert. Tokens 0-3 pick
    expert 0 then 1, tokens 4-7 expert 1 then 0. First choices are placed before any second
    one (GShard's priority), so the first choices fill both experts and all 8 second choices
    are dropped: each token gets its first expert only, at its renormalised weight. (Token
    order instead would give tokens 0-3 both experts and tokens 4-7 nothing.)"""
    layer = moe(moe_capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:2, :2] = torch.tensor([[5.0, 4.0], [4.0, 5.0]])
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    x[0, :, :2] = torch.tensor([[2.0, 0.0]] * 4 + [[0.0, 2.0]] * 4)
    with torch.enable_grad():
        y = layer(x)[0]
    assert layer.stats[2] == 8
    first = torch.sigmoid(torch.tensor(2.0, dtype=torch.float64))  # e^10 / (e^10 + e^8)
    want = torch.stack([first * expert(layer, 0 if i < 4 else 1, t) for i, t in enumerate(x[0])])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    # A capacity no expert reaches drops nothing: the dropless output.
    roomy = moe(moe_capacity_factor=4.0)
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(roomy(x), per_token(roomy, x[0])[None], rtol=1e-5, atol=1e-6)
    assert roomy.stats[2] == 0


def test_a_mixtral_model_equals_transformers_both_ways(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(**{**CFG, "moe_d_ff": 0})
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    ids = torch.randint(0, 64, (2, 12))
    checkpoint.save_hf(ours, str(tmp_path / "out"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(theirs).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max() < 1e-4
    # and theirs in: a Mixtral transformers drew and saved, loaded here
    c = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                   num_experts_per_tok=2, max_position_embeddings=32)
    torch.manual_seed(1)
    theirs = transformers.MixtralForCausalLM(c).eval()
    theirs.save_pretrained(str(tmp_path / "in"))
    ours = checkpoint.load_hf(str(tmp_path / "in")).eval()
    assert ours.cfg.moe_experts == 4 and ours.cfg.moe_d_ff == 24
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max() < 1e-4


def test_export_refuses_what_mixtral_cannot_hold(tmp_path):
    for extra in (dict(moe_every=2), dict(moe_shared_experts=1)):
        with pytest.raises(checkpoint.CheckpointError, match="no Hugging Face counterpart"):
            checkpoint.save_hf(Transformer(ModelConfig(**{**CFG, **extra})), str(tmp_path))


@pytest.mark.parametrize("bad, message", [
    (dict(moe_top_k=5), "model.moe_top_k=5 must be in 1..moe_experts=4"),
    (dict(moe_every=0), "model.moe_every=0 at least 1"),
    (dict(moe_capacity_factor=-1.0), "model.moe_capacity_factor, moe_aux_loss, moe_z_loss and moe_shared_experts "
                                     "must be at least 0"),
])
def test_bad_moe_settings_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**CFG, **bad})


def router_loads(aux, steps=40):
    """Train a tiny MoE whose router starts out favouring expert 0 on every token; return each
    expert's share of the choices (x E, 1 = even) over the last steps."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**CFG, "moe_top_k": 1, "moe_aux_loss": aux, "moe_z_loss": 0.0}))
    with torch.no_grad():  # every token shares a large feature 0, which the router reads as expert 0
        model.embed.weight[:, 0] = 0.5
        for block in model.layers:
            block.mlp.router.weight[0, 0] = 1.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.randint(0, 64, (8, 17), generator=g)
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
        if step == steps - 10:
            for block in model.layers:
                block.mlp.stats = None
    counts = sum(block.mlp.stats[4:] for block in model.layers)
    return (counts / counts.sum() * 4).tolist()


def test_the_balance_loss_keeps_every_expert_in_use():
    """A router that starts out sending every token to expert 0 keeps doing so when only the
    language-model loss trains it (measured: all choices on expert 0); with the default
    balance loss (alpha 1e-2) every expert gets a fair share within 40 steps."""
    free, balanced = router_loads(0.0), router_loads(1e-2)
    assert max(free) > 3.5, free
    assert min(balanced) > 0.6, balanced


def test_generation_with_experts_equals_recomputing_the_text():
    """The KV cache and left-padded batches with MoE layers (capacity mode too, which drops
    nothing here): greedy tokens equal recomputing each prompt's whole text at every step;
    int8 leaves the router and experts in floating point."""
    for extra in ({}, dict(moe_capacity_factor=4.0)):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**{**CFG, **extra, "init_std": 0.1})).eval()
        prompts = [[1, 5, 7, 9], [2, 4]]
        assert infer.generate(model, prompts, 6) == [tokens for tokens, _ in rows_alone(model, prompts, 6)]
    infer.quantize(model, "int8")
    assert isinstance(model.layers[0].mlp.router, torch.nn.Linear) and model.layers[0].mlp.gate_proj.dim() == 3
    assert isinstance(model.layers[0].attn.q_proj, infer.QuantizedLinear)
