import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, train_command

from config import ConfigError, OptimConfig, config_from_dict, load_config, to_toml
import checkpoint
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
    cfg = load_config(write(tmp_path, "[model]\nd_model = 128\nn_heads = 4\n[optim]\nlr = 1\n"),
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
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), override)


def test_missing_data_path_fails_before_training(tmp_path):
    path = write(tmp_path, f"[data]\ntrain = '{tmp_path}/nope_*.bin'\n")
    r = subprocess.run([sys.executable, "train.py", "--config", path], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "data.train: no token shards match" in r.stderr


def test_missing_benchmark_file_fails_before_training(tmp_path, tiny_config):
    cfg = tiny_config(eval=dict(every=10, tasks=f"hellaswag={tmp_path}/nope.jsonl"))
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    r = subprocess.run([sys.executable, "train.py", "--config", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "nope.jsonl" in r.stderr and "step" not in r.stdout


def test_resolved_config_round_trips_through_toml(tmp_path, tiny_config):
    cfg = tiny_config(optim=dict(schedule="wsd"), model=dict(qk_norm=True))
    (tmp_path / "saved.toml").write_text(to_toml(cfg))
    assert load_config(str(tmp_path / "saved.toml")) == cfg


# ----------------------------------------------------------------------------------------
# Schedules

def test_cosine_and_wsd_schedules_closed_form():
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup=10, steps=110, schedule="cosine")
    assert train.lr_at(0, o) == pytest.approx(0.1) and train.lr_at(9, o) == pytest.approx(1.0)
    assert train.lr_at(60, o) == pytest.approx(0.55)  # halfway: the mean of lr and min_lr
    assert train.lr_at(110, o) == pytest.approx(0.1)
    w = OptimConfig(lr=1.0, min_lr=0.0, warmup=10, steps=100, schedule="wsd", decay_frac=0.2)
    assert train.lr_at(50, w) == 1.0 and train.lr_at(79, w) == 1.0
    assert train.lr_at(90, w) == pytest.approx(0.5) and train.lr_at(100, w) == pytest.approx(0.0)


def test_no_weight_decay_on_norms_and_embeddings(tiny_config):
    from model import Transformer
    m = Transformer(tiny_config().model)
    opt = train.build_optimizer(list(m.named_parameters()), OptimConfig(weight_decay=0.1), torch.device("cpu"))
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    assert "embed.weight" not in decayed and "norm.weight" not in decayed and "lm_head.weight" in decayed
    assert "layers.0.attn.q_proj.weight" in decayed
    assert not any("norm" in n for n in decayed)


@pytest.mark.parametrize("tied", [False, True])
def test_build_model_draws_the_whole_models_weights(tiny_config, tied):
    """One process: build_model (meta device, then one tensor at a time) gives each parameter
    init_parameter's draw from a generator seeded with data.seed and the parameter's name,
    keeps a tied head tied, and rebuilds the RoPE tables that the meta device left empty.
    (Other layouts: tests/test_parallel.py.)"""
    import zlib

    from model import Transformer, init_parameter
    cfg = tiny_config(model=dict(tie_embeddings=tied))
    got = checkpoint.build_model(cfg, torch.device("cpu"))
    want = Transformer(cfg.model)
    for name, p in want.named_parameters():
        generator = torch.Generator().manual_seed(zlib.crc32(f"{cfg.data.seed}:{name}".encode()))
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
    assert load_config(os.path.join(run, "config.toml")) == cfg
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


def test_every_start_records_the_code_libraries_devices_and_data(tiny_config, tokens_dir):
    """environment.jsonl gains a line per start, a resume included: the git revision, the
    library versions and the hash of the shards' names and sidecars, recomputed here."""
    import glob
    import hashlib
    cfg = tiny_config(optim=dict(steps=2), checkpoint=dict(every=2))
    train.train(cfg)
    train.train(tiny_config(optim=dict(steps=3), checkpoint=dict(every=2)), resume="auto")
    with open(os.path.join(cfg.log.dir, "environment.jsonl")) as f:
        first, second = map(json.loads, f)
    digest = hashlib.sha256()
    for path in sorted(glob.glob(str(tokens_dir / "train_*.bin"))) + sorted(glob.glob(str(tokens_dir / "val_*.bin"))):
        digest.update(os.path.basename(path).encode() + open(path[:-4] + ".json", "rb").read())
    assert first["data_sha256"] == second["data_sha256"] == digest.hexdigest()
    assert first["torch"] == torch.__version__ and first["resumed_from"] is None
    assert second["resumed_from"].endswith("step_0000002")
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if revision.returncode == 0:  # a clone; an exported tree records null
        assert first["git_revision"] == revision.stdout.strip() and isinstance(first["git_dirty"], bool)


def test_checkpoint_layout_manifest_and_retention(tiny_config):
    cfg = tiny_config(checkpoint=dict(every=5, keep=2))
    model = train.train(cfg)
    ckpt_dir = os.path.join(cfg.log.dir, "checkpoints")
    assert sorted(os.listdir(ckpt_dir)) == ["step_0000015", "step_0000020"]
    final = os.path.join(ckpt_dir, "step_0000020")
    manifest = json.load(open(os.path.join(final, "manifest.json")))
    assert set(manifest["files"]) == {"model-00000.safetensors", "optimizer-00000.safetensors", "index.json",
                                      "state.json", "config.toml",
                                      "tokenizer.json"}
    checkpoint.verify_checkpoint(final)
    _, loaded = checkpoint.load_model(final)
    for (n, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), n
    with open(os.path.join(final, "state.json"), "a") as f:
        f.write(" ")
    with pytest.raises(ValueError, match="state.json: size or sha256 differs"):
        checkpoint.verify_checkpoint(final)


def test_two_process_data_parallel_equals_one_process(tiny_config, tmp_path):
    """torchrun with 2 gloo processes x micro_batch 2 = one process x micro_batch 4."""
    single = tiny_config(optim=dict(steps=6), data=dict(micro_batch=4))
    train.train(single)
    ddp = tiny_config(optim=dict(steps=6), data=dict(micro_batch=2), log=dict(dir=str(tmp_path / "ddp"), every=1))
    cfg_path = tmp_path / "ddp.toml"
    cfg_path.write_text(to_toml(ddp))
    r = subprocess.run(train_command(cfg_path, 2), cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(single.log.dir), losses(ddp.log.dir)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert abs(a[s] - b[s]) < 1e-5, (s, a[s], b[s])


def test_estimate_prints_size_compute_memory_and_cost(capsys):
    cfg = config_from_dict({"model": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12),
                            "data": dict(seq_len=1024, micro_batch=8), "optim": dict(steps=1000)})
    got = train.estimate(cfg, "H100", 0.4, 2.0)
    out = capsys.readouterr().out
    # The closed forms, written out: d_ff = 2048 by Llama's rule; untied head.
    n = 2 * 32000 * 768 + 12 * (4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768) + 768
    fpt = 6 * (n - 32000 * 768) + 12 * 12 * 1024 * 768   # 6 per matmul weight + attention (PaLM, app. B)
    tokens = 1000 * 1024 * 8
    memory = 16 * n + 34 * 1024 * 8 * 768 * 12 + 6 * 1024 * 8 * 32000  # fp32 w + g + AdamW, activations, logits
    hours = fpt * tokens / (989e12 * 0.4) / 3600
    assert got == pytest.approx({"params": n, "flops_per_token": fpt, "tokens": tokens, "memory_bytes": memory,
                                 "gpu_hours": hours})
    assert f"{n / 1e6:,.1f}M" in out and f"{fpt / 1e9:,.2f} GFLOP" in out
    assert f"= {memory / 2**30:.2f} GiB" in out and f"{hours:,.1f} on H100" in out and f"${hours * 2.0:,.0f}" in out


# ----------------------------------------------------------------------------------------
# Bad input on the command line: one line naming the key, file or field; nothing lost

@pytest.mark.parametrize("key, value, message", [
    ("optim.steps", "0", "optim.steps = 0: must be at least 1"),
    ("optim.steps", "-5", "optim.steps = -5: must be at least 1"),
    ("data.micro_batch", "0", "data.micro_batch = 0: must be at least 1"),
    ("data.seq_len", "0", "data.seq_len = 0: must be at least 1"),
    ("data.grad_accum", "0", "data.grad_accum = 0: must be at least 1"),
    ("log.every", "0", "log.every = 0: must be at least 1"),
    ("eval.val_batches", "0", "eval.val_batches = 0: must be at least 1"),
    ("checkpoint.keep", "0", "checkpoint.keep = 0: must be at least 1"),
    ("optim.lr", "-3e-4", "optim.lr = -0.0003: must be at least 0.0"),
    ("optim.lr", "nan", "optim.lr = nan: expected a finite number"),
    ("optim.clip", "-1.0", "optim.clip = -1.0: must be at least 0.0"),
])
def test_numbers_out_of_range_are_named(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, ""), [f"{key}={value}"])


def main_error(capsys, *argv):
    """train.py's command line in this process: the exit code must be 1 and stderr one line."""
    with pytest.raises(SystemExit) as e:
        train.main(list(argv))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def saved(tmp_path, cfg, name="c.toml"):
    path = tmp_path / name
    path.write_text(to_toml(cfg))
    return str(path)


def test_a_second_run_into_the_same_directory_is_refused_until_asked(tiny_config, tmp_path, capsys):
    cfg = tiny_config(optim=dict(steps=4), checkpoint=dict(every=2))
    train.train(cfg)
    run = cfg.log.dir
    before = {p: open(os.path.join(run, p), "rb").read() for p in ("metrics.jsonl", "checkpoints/step_0000004/"
                                                                    "model-00000.safetensors")}
    err = main_error(capsys, "--config", saved(tmp_path, cfg))
    assert f"{run} already holds a run" in err and "--resume auto" in err and "--start-over" in err
    assert all(open(os.path.join(run, p), "rb").read() == b for p, b in before.items())  # nothing lost
    train.main(["--config", saved(tmp_path, cfg), "--start-over"])
    asides = [n for n in os.listdir(run) if n.startswith("metrics.jsonl.")]
    assert len(asides) == 1 and open(os.path.join(run, asides[0]), "rb").read() == before["metrics.jsonl"]
    assert sorted(losses(run)) == [1, 2, 3, 4]  # the new run alone
    assert any(n.startswith("checkpoints.") for n in os.listdir(run))


def test_a_fresh_start_under_resume_auto_starts_a_fresh_metrics_file(tiny_config):
    """A restart loop whose first attempt died before its first checkpoint: the new attempt
    must not append to the dead one's metrics (duplicate steps, a stale first loss)."""
    cfg = tiny_config(optim=dict(steps=3))
    os.makedirs(cfg.log.dir)
    stale = '{"step": 1, "loss": 99.0}\n{"step": 2, "loss": 98.0}\n'
    with open(os.path.join(cfg.log.dir, "metrics.jsonl"), "w") as f:
        f.write(stale)
    train.train(cfg, resume="auto")
    got = losses(cfg.log.dir)
    assert sorted(got) == [1, 2, 3] and got[1] != 99.0
    asides = [n for n in os.listdir(cfg.log.dir) if n.startswith("metrics.jsonl.")]
    assert [open(os.path.join(cfg.log.dir, n)).read() for n in asides] == [stale]
    assert "99.0" not in open(os.path.join(cfg.log.dir, "report.md")).read()


def test_every_resume_is_verified_and_another_shape_is_named(tiny_config, tmp_path, capsys):
    cfg = tiny_config(optim=dict(steps=4), checkpoint=dict(every=2))
    train.train(cfg)
    ckpts = os.path.join(cfg.log.dir, "checkpoints")
    weights = os.path.join(ckpts, "step_0000002", "model-00000.safetensors")
    with open(weights, "r+b") as f:
        f.seek(os.path.getsize(weights) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    path = saved(tmp_path, cfg)
    assert f"{weights}: size or sha256 differs" in main_error(capsys, "--config", path, "--resume", "2")
    os.remove(os.path.join(ckpts, "step_0000004", "manifest.json"))
    err = main_error(capsys, "--config", path, "--resume", os.path.join(ckpts, "step_0000004"))
    assert "step_0000004: no manifest.json" in err
    assert "no such checkpoint directory" in main_error(capsys, "--config", path, "--resume", "7")
    train.train(tiny_config(optim=dict(steps=2), log=dict(dir=str(tmp_path / "b"))))
    wider = tiny_config(optim=dict(steps=4), log=dict(dir=str(tmp_path / "b")), model=dict(d_model=128))
    err = main_error(capsys, "--config", saved(tmp_path, wider), "--resume", "auto")
    assert "holds another model: model.d_model is 64 there, 128 here" in err


def test_shards_of_another_tokenizer_or_vocabulary_are_refused(tiny_config, tokens_dir, tmp_path, capsys):
    shards = tmp_path / "tokens"
    shutil.copytree(tokens_dir, shards)
    small = tiny_config(model=dict(vocab_size=256), data=dict(train=str(shards / "train_*.bin"),
                                                               val=str(shards / "val_*.bin")))
    err = main_error(capsys, "--config", saved(tmp_path, small))
    assert "vocab_size = 512, more than model.vocab_size = 256" in err
    odd = sorted(shards.glob("val_*.json"))[-1]
    meta = json.loads(odd.read_text())
    odd.write_text(json.dumps({**meta, "tokenizer_sha256": "0" * 64}))
    cfg = tiny_config(data=dict(train=str(shards / "train_*.bin"), val=str(shards / "val_*.bin")))
    err = main_error(capsys, "--config", saved(tmp_path, cfg))
    assert f"data.val: {str(odd)[:-5]}.bin was made with tokenizer_sha256 = '{'0' * 64}'" in err


def test_under_torchrun_an_error_is_one_line_printed_once(tiny_config, tmp_path):
    cfg = tiny_config(parallel=dict(tp=4))  # 2 processes cannot hold tp = 4
    r = subprocess.run(train_command(saved(tmp_path, cfg), 2), cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error: ")]
    assert r.returncode != 0 and len(errors) == 1 and "parallel.tp=4" in errors[0] and "world size of 2" in errors[0]


# ----------------------------------------------------------------------------------------
# Starting from existing weights

def _train(cfg):
    train.train(cfg)


def test_init_from_a_transformers_checkpoint_under_tp2_equals_one_process(tiny_config, tmp_path, capsys):
    """[train] init_from a transformers Llama directory: the first loss is transformers' own on
    that batch, under one process and under tp2 alike; another shape is refused by field."""
    transformers = pytest.importorskip("transformers")
    from conftest import spawn

    import data
    hf = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(hf, attn_implementation="eager")
    theirs.save_pretrained(tmp_path / "hf")
    one = tiny_config(train=dict(init_from=str(tmp_path / "hf")), optim=dict(steps=1))
    tp2 = tiny_config(train=dict(init_from=str(tmp_path / "hf")), optim=dict(steps=1), parallel=dict(tp=2),
                      log=dict(dir=str(tmp_path / "tp2")))
    train.train(one)
    spawn(2, _train, tp2)
    d = one.data
    x, y = data.Loader(d.train, d.seq_len, d.micro_batch, seed=d.seed).next_batch()
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(theirs(x).logits.flatten(0, 1), y.flatten()).item()
    assert abs(losses(one.log.dir)[1] - want) < 1e-5 and abs(losses(tp2.log.dir)[1] - want) < 1e-5
    wider = tiny_config(train=dict(init_from=str(tmp_path / "hf")), model=dict(d_model=128),
                        log=dict(dir=str(tmp_path / "wider")))
    capsys.readouterr()
    err = main_error(capsys, "--config", saved(tmp_path, wider))
    assert f"{tmp_path / 'hf'} holds another model: model.d_model is 64 there, 128 here" in err


# ----------------------------------------------------------------------------------------
# Data mixtures and packed documents

def small_source(src, dst, tokens):
    """A copy of the first shards of src cut to `tokens` tokens: a source that soon repeats."""
    import numpy as np

    import data
    os.makedirs(dst)
    for split in ("train", "val"):
        path = data.find_shards(str(src / f"{split}_*.bin"))[0]
        meta = json.load(open(path[:-4] + ".json"))
        n = min(tokens, meta["tokens"])
        np.fromfile(path, dtype=meta["dtype"], count=n).tofile(os.path.join(dst, f"{split}_00000_00000.bin"))
        json.dump({**meta, "tokens": n}, open(os.path.join(dst, f"{split}_00000_00000.json"), "w"))
    shutil.copy(src / "tokenizer.json", dst)


def test_a_mixture_logs_tokens_epochs_and_validation_per_source(tiny_config, tokens_dir, tmp_path):
    import data
    import eval as evaluation
    small_source(tokens_dir, tmp_path / "small", 2000)
    table = lambda split: {"big": {"path": str(tokens_dir / f"{split}_*.bin"), "weight": 1.0},  # noqa: E731
                           "small": {"path": str(tmp_path / f"small/{split}_*.bin"), "weight": 3.0}}
    cfg = tiny_config(data=dict(train=table("train"), val=table("val")), optim=dict(steps=30),
                      eval=dict(val_every=0, val_batches=2))
    train.train(cfg)
    records = [json.loads(line) for line in open(os.path.join(cfg.log.dir, "metrics.jsonl"))]
    last = [r for r in records if r.get("step") == 30 and "loss" in r and "event" not in r][0]
    assert last["tokens/big"] + last["tokens/small"] == 30 * 4 * 32 and last["tokens/small"] > last["tokens/big"]
    assert last["epochs/small"] > 1 and [r["source"] for r in records if r.get("event") == "repeat"] == ["small"]
    val = [r for r in records if "val_loss/small" in r][-1]
    _, model = checkpoint.load_model(checkpoint.step_dirs(os.path.join(cfg.log.dir, "checkpoints"))[-1])
    token_bytes = torch.tensor(data.token_byte_lengths(str(tokens_dir / "tokenizer.json")))
    for name, source in table("val").items():  # each source validated alone, outside train.py
        loader = data.Loader(source["path"], 32, 4, shuffle=False)
        loss, bpb = evaluation.loss_and_bpb(model, loader, 2, token_bytes)
        assert abs(val[f"val_loss/{name}"] - loss) < 1e-5 and abs(val[f"val_bpb/{name}"] - bpb) < 1e-5
    assert abs(val["val_loss"] - (val["val_loss/big"] + val["val_loss/small"]) / 2) < 1e-9
    assert "small" in open(os.path.join(cfg.log.dir, "report.md")).read()


def test_a_source_of_another_tokenizer_is_named(tiny_config, tokens_dir, tmp_path, capsys):
    small_source(tokens_dir, tmp_path / "other", 2000)
    sidecar = tmp_path / "other" / "train_00000_00000.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "tokenizer_sha256": "1" * 64}))
    table = {"a": {"path": str(tokens_dir / "train_*.bin"), "weight": 1.0},
             "b": {"path": str(tmp_path / "other/train_*.bin"), "weight": 1.0}}
    err = main_error(capsys, "--config", saved(tmp_path, tiny_config(data=dict(train=table))))
    assert "data.train.b: " in err and "tokenizer_sha256" in err


def test_packed_documents_train_with_the_loss_of_the_masked_model(tiny_config, tokens_dir, tmp_path):
    """data.doc_mask: the first loss is the fresh model's on the first batch with attention
    cut at each <|bos|> of the shards (their sidecar's bos_id), here every few tokens."""
    import numpy as np

    import data
    from model import document_starts
    from prep import shards
    meta = data.read_sidecar(data.find_shards(str(tokens_dir / "train_*.bin"))[0])
    tokens = np.random.default_rng(0).integers(7, 512, 20_000).astype(np.uint16)
    tokens[::np.random.default_rng(1).integers(3, 15)] = meta["bos_id"]  # documents of a few tokens
    keep = {k: meta[k] for k in ("vocab_size", "bos_id", "tokenizer_sha256")}
    shards.write_shard(str(tmp_path / "train_00000.bin"), tokens, {"documents": 1, "bytes": 1, **keep})
    shutil.copy(tokens_dir / "tokenizer.json", tmp_path)
    cfg = tiny_config(data=dict(train=str(tmp_path / "train_*.bin"), doc_mask=True), optim=dict(steps=1))
    train.train(cfg)
    d = cfg.data
    x, y = data.Loader(d.train, d.seq_len, d.micro_batch, seed=d.seed).next_batch()
    model = checkpoint.build_model(cfg)
    with torch.no_grad():
        want = model(x, y, doc_starts=document_starts(x, meta["bos_id"])).item()
        plain = model(x, y).item()
    assert abs(losses(cfg.log.dir)[1] - want) < 1e-6 and abs(want - plain) > 1e-4
