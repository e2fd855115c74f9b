import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, train_command

import train


def losses(run_dir, key="loss"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


# ----------------------------------------------------------------------------------------
# Config

def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_config_loads_sections_and_overrides(tmp_path):
    cfg = train.load_config(write(tmp_path, "[model]\nd_model = 128\nn_heads = 4\n[optim]\nlr = 1\n"),
                            ["optim.schedule=wsd", "data.train=dir/train_*.bin", "model.tie_embeddings=true"])
    assert cfg.model.d_model == 128 and cfg.model.head_dim == 32
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.schedule == "wsd" and cfg.data.train == "dir/train_*.bin" and cfg.model.tie_embeddings


@pytest.mark.parametrize("text, override, message", [
    ("[model]\nd_modle = 128\n", [], r"unknown key model.d_modle; valid keys of \[model\]: vocab_size, d_model"),
    ("[modle]\n", [], r"unknown section \[modle\]"),
    ("[optim]\nlr = '3e-4'\n", [], r"optim.lr = '3e-4': expected float, got str"),
    ("[data]\nseq_len = 1.5\n", [], r"data.seq_len = 1.5: expected int, got float"),
    ("[model]\ntie_embeddings = 1\n", [], r"model.tie_embeddings = 1: expected bool"),
    ("", ["optim.schedule=linear"], r"optim.schedule = 'linear': choose one of 'cosine', 'wsd'"),
    ("", ["optim.lr"], r"expected section.key=value"),
    ("[model]\nn_heads = 6\nn_kv_heads = 4\nd_model = 96\n", [], r"model.n_heads=6 must be a multiple of"),
    ("[model\n", [], r"invalid TOML"),
    ("[model]\nmax_seq_len = 128\n[data]\nseq_len = 256\n", [],
     r"data.seq_len = 256 is longer than model.max_seq_len = 128"),
])
def test_bad_config_is_named(tmp_path, text, override, message):
    with pytest.raises(train.ConfigError, match=message):
        train.load_config(write(tmp_path, text), override)


def test_missing_data_path_fails_before_training(tmp_path):
    path = write(tmp_path, f"[data]\ntrain = '{tmp_path}/nope_*.bin'\n")
    r = subprocess.run([sys.executable, "train.py", "--config", path], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "data.train: no token shards match" in r.stderr


def test_missing_benchmark_file_fails_before_training(tmp_path, tiny_config):
    cfg = tiny_config(eval=dict(every=10, tasks=f"hellaswag={tmp_path}/nope.jsonl"))
    path = tmp_path / "c.toml"
    path.write_text(train.to_toml(cfg))
    r = subprocess.run([sys.executable, "train.py", "--config", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "nope.jsonl" in r.stderr and "step" not in r.stdout


def test_resolved_config_round_trips_through_toml(tmp_path, tiny_config):
    cfg = tiny_config(optim=dict(schedule="wsd"), model=dict(qk_norm=True))
    (tmp_path / "saved.toml").write_text(train.to_toml(cfg))
    assert train.load_config(str(tmp_path / "saved.toml")) == cfg


# ----------------------------------------------------------------------------------------
# Schedules

def test_cosine_and_wsd_schedules_closed_form():
    o = train.OptimConfig(lr=1.0, min_lr=0.1, warmup=10, steps=110, schedule="cosine")
    assert train.lr_at(0, o) == pytest.approx(0.1) and train.lr_at(9, o) == pytest.approx(1.0)
    assert train.lr_at(60, o) == pytest.approx(0.55)  # halfway: the mean of lr and min_lr
    assert train.lr_at(110, o) == pytest.approx(0.1)
    w = train.OptimConfig(lr=1.0, min_lr=0.0, warmup=10, steps=100, schedule="wsd", decay_frac=0.2)
    assert train.lr_at(50, w) == 1.0 and train.lr_at(79, w) == 1.0
    assert train.lr_at(90, w) == pytest.approx(0.5) and train.lr_at(100, w) == pytest.approx(0.0)


def test_no_weight_decay_on_norms_and_embeddings(tiny_config):
    from model import Transformer
    m = Transformer(tiny_config().model)
    opt = train.build_optimizer(list(m.named_parameters()), train.OptimConfig(weight_decay=0.1), torch.device("cpu"))
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    assert "embed.weight" not in decayed and "norm.weight" not in decayed and "lm_head.weight" in decayed
    assert "layers.0.attn.q_proj.weight" in decayed
    assert not any("norm" in n for n in decayed)


@pytest.mark.parametrize("tied", [False, True])
def test_build_model_draws_the_whole_models_weights(tiny_config, tied):
    """One process: build_model (meta device, then one tensor at a time) gives each parameter
    init_parameter's draw in the whole model's order, keeps a tied head tied, and rebuilds the
    RoPE tables that the meta device left empty. (Other layouts: tests/test_parallel.py.)"""
    import parallel
    from model import Transformer, init_parameter
    cfg = tiny_config(model=dict(tie_embeddings=tied))
    got = train.build_model(cfg, parallel.Grid(), torch.device("cpu"))
    want = Transformer(cfg.model)
    generator = torch.Generator().manual_seed(cfg.data.seed)
    for name, p in want.named_parameters():
        init_parameter(name, p, cfg.model, generator)
    assert (got.lm_head.weight is got.embed.weight) == tied
    got_state, got_buffers = got.state_dict(), dict(got.named_buffers())
    assert got_state.keys() == want.state_dict().keys()
    for name, t in want.state_dict().items():
        assert torch.equal(got_state[name], t), name
    for name, t in want.named_buffers():
        assert torch.equal(got_buffers[name], t), name


# ----------------------------------------------------------------------------------------
# Training, checkpoints, resume

def test_training_lowers_loss_and_writes_run_directory(tiny_config):
    cfg = tiny_config(optim=dict(steps=30), eval=dict(val_every=15))
    train.train(cfg)
    run = cfg.log.dir
    curve = losses(run)
    assert sorted(curve) == list(range(1, 31)) and curve[30] < curve[1] - 0.5
    val = losses(run, "val_bpb")
    assert sorted(val) == [15, 30] and all(math.isfinite(v) for v in val.values())
    assert train.load_config(os.path.join(run, "config.toml")) == cfg
    report = open(os.path.join(run, "report.md")).read()
    assert "bits per byte" in report and "tokens/s" in report


def test_exact_resume_gives_bitwise_equal_losses(tiny_config, tmp_path):
    cfg = tiny_config(checkpoint=dict(every=10))
    train.train(cfg)
    straight = losses(cfg.log.dir)
    ckpt = os.path.join(cfg.log.dir, "checkpoints", "step_0000010")
    resumed_cfg = tiny_config(log=dict(dir=str(tmp_path / "resumed")))
    train.train(resumed_cfg, resume=ckpt)
    resumed = losses(resumed_cfg.log.dir)
    assert sorted(resumed) == list(range(11, 21))
    assert all(resumed[s] == straight[s] for s in resumed), (resumed, straight)


def test_checkpoint_layout_manifest_and_retention(tiny_config):
    cfg = tiny_config(checkpoint=dict(every=5, keep=2))
    model = train.train(cfg)
    ckpt_dir = os.path.join(cfg.log.dir, "checkpoints")
    assert sorted(os.listdir(ckpt_dir)) == ["step_0000015", "step_0000020"]
    final = os.path.join(ckpt_dir, "step_0000020")
    manifest = json.load(open(os.path.join(final, "manifest.json")))
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.safetensors", "state.json", "config.toml",
                                      "tokenizer.json"}
    train.verify_checkpoint(final)
    _, loaded = train.load_checkpoint(final)
    for (n, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), n
    with open(os.path.join(final, "state.json"), "a") as f:
        f.write(" ")
    with pytest.raises(ValueError, match="state.json: size or sha256 differs"):
        train.verify_checkpoint(final)


def test_two_process_data_parallel_equals_one_process(tiny_config, tmp_path):
    """torchrun with 2 gloo processes x micro_batch 2 = one process x micro_batch 4."""
    single = tiny_config(optim=dict(steps=6), data=dict(micro_batch=4))
    train.train(single)
    ddp = tiny_config(optim=dict(steps=6), data=dict(micro_batch=2), log=dict(dir=str(tmp_path / "ddp"), every=1))
    cfg_path = tmp_path / "ddp.toml"
    cfg_path.write_text(train.to_toml(ddp))
    r = subprocess.run(train_command(cfg_path, 2), cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(single.log.dir), losses(ddp.log.dir)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert abs(a[s] - b[s]) < 1e-5, (s, a[s], b[s])


def test_estimate_prints_size_compute_memory_and_cost(capsys, tiny_config):
    cfg = train.config_from_dict({"model": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12,
                                                n_kv_heads=12), "data": dict(seq_len=1024, micro_batch=8),
                                  "optim": dict(steps=1000)})
    train.estimate(cfg, "H100", 0.4, 2.0)
    out = capsys.readouterr().out
    n = 2 * 32000 * 768 + 12 * (4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768) + 768
    assert f"{n / 1e6:,.1f}M" in out
    for word in ("FLOPs per token", "training FLOPs", "compute-optimal", "memory per GPU", "GPU-hours", "cost"):
        assert word in out
