"""Mamba layers: step-by-step decoding against the parallel forward (pure and hybrid, batched
with left padding), Mamba against transformers both ways, the layer patterns and their errors,
and tiny models training below the unigram baseline."""
import pytest
import torch

import checkpoint
import infer
from conftest import check_cached_decoding
from model import ModelConfig, Transformer

CFG = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64, ssm_state=8)


def tiny(pattern, seed=0, **extra):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**CFG, "block_pattern": pattern, "init_std": 0.1, **extra})).eval()


@pytest.mark.parametrize("pattern, extra", [("MMMM", {}), ("MAMA", {}), ("AMMA", dict(moe_experts=4))])
def test_recurrent_decoding_equals_the_parallel_forward(pattern, extra):
    """Prefill (the parallel scan, keeping its last state) then one token at a time through
    the recurrence, in a batch of left-padded prompts: every step's logits equal the parallel
    forward over the row's whole text."""
    model = tiny(pattern, **extra)
    prompts, steps = [[1, 5, 7, 9, 11], [3], [2, 4, 6, 8, 10, 12, 14, 16, 18]], 6
    want = check_cached_decoding(model, model, prompts, steps)
    assert infer.generate(model, prompts, steps) == [t for t, _ in want]


def test_a_mamba_model_equals_transformers_both_ways(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = tiny("MMMM", tie_embeddings=True, init_std=0.02)
    ids = torch.randint(0, 64, (2, 20))
    checkpoint.save_hf(ours, str(tmp_path / "out"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(theirs).__name__ == "MambaForCausalLM"
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max() < 1e-4
    c = transformers.MambaConfig(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                 conv_kernel=4)
    torch.manual_seed(1)
    theirs = transformers.MambaForCausalLM(c).eval()
    theirs.save_pretrained(str(tmp_path / "in"))
    ours = checkpoint.load_hf(str(tmp_path / "in")).eval()
    assert ours.cfg.block_pattern == "MM" and ours.cfg.ssm_dt_rank == 2
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max() < 1e-4


def test_patterns_and_what_is_refused(tmp_path):
    model = tiny("MM AM")
    assert [hasattr(b, "mamba") for b in model.layers] == [True, True, False, True]
    assert [hasattr(b, "mlp") for b in model.layers] == [False, False, True, False]  # Mamba's expansion is its MLP
    with pytest.raises(ValueError, match="model.block_pattern='MMA' must have one letter, A or M, for each of the "
                                         "model.n_layers=4 layers"):
        ModelConfig(**{**CFG, "block_pattern": "MMA"})
    with pytest.raises(ValueError, match="must have one letter, A or M"):
        ModelConfig(**{**CFG, "block_pattern": "MMAX"})
    with pytest.raises(checkpoint.CheckpointError, match="has no Hugging Face counterpart"):
        checkpoint.save_hf(tiny("MAMA", tie_embeddings=True), str(tmp_path))
    with pytest.raises(ValueError, match="a Mamba layer's running state does not"):
        infer.speculative_decode(tiny("MMMM"), tiny("MMMM"), [1, 2], 4)


@pytest.mark.parametrize("pattern", ["MM", "MA"])
def test_a_tiny_mamba_and_hybrid_learn_below_the_unigram_baseline(pattern, tiny_config):
    """train.py on the session's real shards: the validation loss ends well below the unigram
    baseline, the validation tokens' cross-entropy under the training tokens' frequencies:
    the best a model blind to context can do."""
    import glob
    import json

    import numpy as np

    import train
    cfg = tiny_config(model=dict(block_pattern=pattern), optim=dict(steps=120),
                      eval=dict(val_every=120, val_batches=4))
    counts = [np.bincount(np.concatenate([np.fromfile(f, dtype=np.uint16) for f in sorted(glob.glob(g))]),
                          minlength=512) for g in (cfg.data.train, cfg.data.val)]
    p = (counts[0] + 1) / (counts[0] + 1).sum()
    unigram = -(counts[1] * np.log(p)).sum() / counts[1].sum()
    train.train(cfg)
    with open(f"{cfg.log.dir}/metrics.jsonl") as f:
        val = [r["val_loss"] for r in map(json.loads, f) if "val_loss" in r][-1]
    assert val < unigram - 0.3, (val, unigram)
