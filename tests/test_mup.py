"""Stability tools: muP (the identity at width_mult 1, flat activations across widths), Muon
(Newton-Schulz, the update against a plain reference, resume), the sweep runner, the plot
script and the tracking backends."""
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

import train
from config import ConfigError, OptimConfig, to_toml
from model import ModelConfig, Transformer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))


def test_mup_at_width_mult_one_is_the_standard_model():
    torch.manual_seed(0)
    standard = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2))
    torch.manual_seed(0)
    mup = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, mup=True,
                                  mup_base_width=32))
    x = torch.randint(0, 64, (2, 8))
    for model in (standard, mup):
        opt = train.build_optimizer(list(model.named_parameters()), OptimConfig(lr=1e-2), torch.device("cpu"),
                                    model.cfg)
        train.set_lr(opt, 1e-2)
        model(x, x).backward()
        opt.step()
    for (n, a), b in zip(standard.state_dict().items(), mup.state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.equal(standard(x), mup(x))
    wide = ModelConfig(vocab_size=64, d_model=128, n_layers=2, n_heads=2, n_kv_heads=2, mup=True, mup_base_width=32)
    groups = train.build_optimizer(list(Transformer(wide).named_parameters()), OptimConfig(), torch.device("cpu"),
                                   wide).param_groups
    assert sorted({g["lr_scale"] for g in groups}) == [0.25, 1.0]  # hidden matrices at lr / width_mult


def test_coordinate_check_is_flat_under_mup_and_grows_without(tiny_config):
    """From width 64 to 512 after 3 Adam steps at lr 1e-2, every layer type's mean |output|
    stays within 2x under muP (measured: 0.6-1.1x); under the standard parametrisation the
    attention and MLP outputs grow by more than 10x (measured: about 50x and 400x)."""
    import coord_check
    cfg = tiny_config(model=dict(n_layers=2, n_heads=4, n_kv_heads=4), optim=dict(lr=1e-2, weight_decay=0.0),
                      data=dict(seq_len=32, micro_batch=4))
    result = coord_check.coord_check(cfg, [64, 512], steps=3)
    for t in coord_check.LAYER_TYPES:
        ratio = result["mup"][512][t] / result["mup"][64][t]
        assert 1 / 2 < ratio < 2, (t, ratio)
    for t in ("attention", "mlp"):
        assert result["standard"][512][t] / result["standard"][64][t] > 10, t


def test_newton_schulz_gives_singular_values_near_one():
    torch.manual_seed(0)
    # Gaussian matrices of aspect 3 (singular values within about 3x of each other, as in
    # gradients); five steps do not lift singular values far below the largest, by design.
    for shape in ((32, 96), (96, 32), (3, 32, 96)):
        g = torch.randn(shape) * 1e-3
        s = torch.linalg.svdvals(train.newton_schulz(g))
        assert s.min() > 0.6 and s.max() < 1.25, (shape, s.min(), s.max())
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        assert torch.nn.functional.cosine_similarity(train.newton_schulz(g).flatten(), (u @ vh).flatten(), 0) > 0.97


def plain_muon(w, grads, lr, momentum, wd):
    """Muon written out for one matrix, every step in the open: momentum, Nesterov, five
    quintic Newton-Schulz steps on the normalised matrix, the shape scale, decoupled decay."""
    w, buf = w.clone(), torch.zeros_like(w)
    for g in grads:
        buf = momentum * buf + g
        x = g + momentum * buf
        x = x / x.norm()
        for _ in range(5):
            a = x @ x.T
            x = 3.4445 * x - 4.7750 * a @ x + 2.0315 * a @ a @ x
        w = w * (1 - lr * wd) - lr * max(1, w.shape[0] / w.shape[1]) ** 0.5 * x
    return w


def test_muon_update_equals_a_plain_reference():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2))
    o = OptimConfig(name="muon", lr=1e-3, muon_lr=0.05, weight_decay=0.1)
    opt = train.build_optimizer(list(model.named_parameters()), o, torch.device("cpu"), model.cfg)
    adam = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in [model.embed.weight]], lr=1e-3,
                             betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=0.0)
    w0 = model.layers[0].attn.q_proj.weight.detach().clone()
    grads = [torch.randn_like(w0) for _ in range(3)]
    for g in grads:
        train.set_lr(opt, o.lr)
        for p in model.parameters():
            p.grad = g.clone() if p is model.layers[0].attn.q_proj.weight else torch.ones_like(p)
        adam.param_groups[0]["params"][0].grad = torch.ones_like(model.embed.weight)
        opt.step()
        adam.step()
    torch.testing.assert_close(model.layers[0].attn.q_proj.weight, plain_muon(w0, grads, 0.05, 0.95, 0.1))
    torch.testing.assert_close(model.embed.weight, adam.param_groups[0]["params"][0])  # the AdamW part


def test_muon_trains_and_resumes_exactly(tiny_config):
    cfg = tiny_config(optim=dict(name="muon", steps=4), checkpoint=dict(every=2, asynchronous=False))
    train.train(cfg)
    whole = [r["loss"] for r in map(json.loads, open(os.path.join(cfg.log.dir, "metrics.jsonl"))) if "loss" in r]
    assert whole[-1] < whole[0]
    os.remove(os.path.join(cfg.log.dir, "checkpoints", "step_0000004", "manifest.json"))  # make the last one bad
    train.train(cfg, resume="auto")  # from step 2
    again = [r["loss"] for r in map(json.loads, open(os.path.join(cfg.log.dir, "metrics.jsonl"))) if "loss" in r]
    assert again == whole
    with pytest.raises(ConfigError, match="Muon orthogonalises whole"):
        tiny_config(optim=dict(name="muon"), parallel=dict(zero=1))


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_sweep_table_resume_and_plot(tiny_config, tmp_path, capsys):
    import plot
    import sweep
    config = tmp_path / "c.toml"
    config.write_text(to_toml(tiny_config(optim=dict(steps=2, warmup=0), eval=dict(val_batches=1))))
    out = tmp_path / "sweep"
    sweep.main(["--config", str(config), "--grid", "optim.lr=1e-3,1e-2", "--out", str(out), "--parallel", "2"])
    sweep.main(["--config", str(config), "--grid", "optim.lr=1e-3,1e-2,1e-1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.count("started") == 3 and "done     optim.lr=1e-3" in printed  # the second call ran one
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    runs = [out / r["run"] for r in rows]
    finals = [[r["val_loss"] for r in plot.read_metrics(d) if "val_loss" in r][-1] for d in runs]
    assert [r["val_loss"] for r in rows] == finals
    best = min(rows, key=lambda r: r["val_loss"])["run"]
    assert [line for line in open(out / "results.md") if "best lr" in line][0].startswith(
        f"| {best.split('=')[1]} |")
    fig = plot.plot_runs([str(runs[0]), str(runs[1])], str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 1000
    loss_axis = fig.axes[0]
    for line, d in zip(loss_axis.lines, runs[:2]):
        assert list(line.get_ydata()) == [r["loss"] for r in plot.read_metrics(d) if "loss" in r]


def test_tracking_backends(tiny_config, capsys):
    with pytest.raises(ConfigError, match="unknown"):
        tiny_config(log=dict(backends="tensorboard,neptune"))
    absent = [b for b in ("wandb", "mlflow") if importlib.util.find_spec(b) is None]
    cfg = tiny_config(optim=dict(steps=3), log=dict(backends=",".join(["tensorboard", *absent])))
    train.train(cfg)
    err = capsys.readouterr().err
    for name in absent:
        assert err.count(f"log.backends: {name} is not installed") == 1
    if importlib.util.find_spec("tensorboard") is None:
        assert "tensorboard is not installed" in err
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(cfg.log.dir, "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    expected = [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(cfg.log.dir, "metrics.jsonl")))
                if "loss" in r and "event" not in r]
    assert logged == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected]
    assert math.isfinite(events.Scalars("val_loss")[-1].value)
