"""Every parallel layout against the single-process run: same initial weights, same global
batch; the loss, every gradient (gathered from its shards) and the parameters after three
AdamW steps must match. Processes talk over gloo on the CPU."""
import dataclasses
import json
import os

import pytest
import torch
import torch.distributed as dist
from conftest import spawn

from config import config_from_dict
import checkpoint
import parallel
import train
from model import Transformer

MODEL = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=32)
SEQ, MICRO, ACCUM, STEPS = 16, 4, 2, 3


def make_cfg(layout, model=None):
    """A Config for a layout; micro_batch shrinks with dp so the global batch stays MICRO."""
    p = dict(layout)
    dp = p.get("dp", 1)
    return config_from_dict({
        "model": {**MODEL, **(model or {})}, "parallel": p,
        "data": dict(seq_len=SEQ, micro_batch=MICRO // dp, grad_accum=ACCUM, seed=0),
        # eps 1e-6, not 1e-8: on random tokens many gradients are ~1e-9, where AdamW's g / (|g| + eps)
        # turns last-bit differences of summation order into 1e-4 parameter differences.
        "optim": dict(lr=1e-2, warmup=1, steps=STEPS, clip=1.0, eps=1e-6)})


def global_batches(step):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, MODEL["vocab_size"], (ACCUM, MICRO, SEQ + 1), generator=g)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def run_steps(cfg, grid=None):
    """Build, parallelize and train STEPS steps as train.py does; return the first step's loss
    and full gradients, every step's loss and the final full parameters (on rank 0)."""
    grid = grid or parallel.make_grid(cfg.parallel, cfg.model, cfg.data)
    model = checkpoint.build_model(cfg, torch.device("cpu"), grid=grid)  # the whole model's weights, this rank's part
    dp = parallel.DataParallel(model, grid, zero=cfg.parallel.zero, bucket_mb=0.004)
    named = dp.optimizer_params(model)
    opt = train.build_optimizer(named, cfg.optim, torch.device("cpu"))
    mb = cfg.data.micro_batch
    out = {"losses": []}
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = train.lr_at(step, cfg.optim)
        batches = [(x[grid.dp_rank * mb:(grid.dp_rank + 1) * mb], y[grid.dp_rank * mb:(grid.dp_rank + 1) * mb])
                   for x, y in global_batches(step)]
        loss = parallel.forward_backward(model, grid, dp, batches, cfg.parallel)
        if step == 0:
            out["grads"] = parallel.full_tensors(full_grads(model, dp), grid)
        out["losses"].append(loss.item())
        parallel.clip_grad_norm(named, cfg.optim.clip, grid, dp.zero)
        opt.step()
        dp.after_step()
        dp.zero_grad(model)
    out["params"] = parallel.full_tensors(full_params(model, dp), grid)
    out["events"] = dp.events
    return out


def gather_buckets(dp, slices):
    """{name: tensor of this rank's parameter shape} from every rank's 1/n of each bucket."""
    out = {}
    for bucket in dp.buckets:
        flat = torch.empty(bucket.data.shape)
        dist.all_gather_into_tensor(flat, slices(bucket), group=dp.group)
        for name, p, off in zip(bucket.names, bucket.params, bucket.offsets):
            out[name] = flat[off:off + p.numel()].view(p.shape)
    return out


def full_grads(model, dp):
    """Gradients of this rank's parameters; under ZeRO the reduced slices are all-gathered."""
    if not dp.zero:
        return {n: p.grad for n, p in model.named_parameters()}
    return gather_buckets(dp, lambda bucket: bucket.shard)


def full_params(model, dp):
    """This rank's parameters; under ZeRO-3 the blocks' kept slices are all-gathered."""
    params = dict(model.named_parameters())
    if dp.zero == 3:
        params.update(gather_buckets(dp, lambda b: b.shard_data if b.sharded else b.data.chunk(dp.n)[dp.rank]))
    return params


@pytest.fixture(scope="module")
def reference():
    return {key: run_steps(make_cfg({}, model)) for key, model in
            (("untied", None), ("tied_qk", dict(tie_embeddings=True, qk_norm=True)))}


LAYOUTS = {
    "dp2": dict(dp=2),
    "tp2": dict(tp=2),
    "tp2_sp": dict(tp=2, sequence_parallel=True),
    "cp2": dict(cp=2),
    "pp2_afab": dict(pp=2, pp_schedule="afab"),
    "pp2_1f1b": dict(pp=2, pp_schedule="1f1b"),
    "dp2_zero1": dict(dp=2, zero=1),
    "dp2_tp2": dict(dp=2, tp=2),
    "tp2_pp2": dict(tp=2, pp=2),
    "pp2_cp2": dict(pp=2, cp=2),
    "cp4": dict(cp=4),
    "tp2_sp_cp2_tied_qk": dict(tp=2, cp=2, sequence_parallel=True),
    "pp2_tied_qk": dict(pp=2),
    "dp2_tp2_pp2": dict(dp=2, tp=2, pp=2),
    "dp2_zero2": dict(dp=2, zero=2),
    "dp2_zero3": dict(dp=2, zero=3),
    "dp2_zero3_recompute": dict(dp=2, zero=3, recompute=True),
    "dp2_tp2_sp_zero3_tied_qk": dict(dp=2, tp=2, zero=3, sequence_parallel=True),
    "dp2_tp2_sp_zero1_tied_qk": dict(dp=2, tp=2, zero=1, sequence_parallel=True),
    "dp2_pp2_zero2_tied_qk": dict(dp=2, pp=2, zero=2),
}
TIED = {"tp2_sp_cp2_tied_qk", "pp2_tied_qk", "dp2_tp2_sp_zero3_tied_qk", "dp2_tp2_sp_zero1_tied_qk",
        "dp2_pp2_zero2_tied_qk"}


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_equals_single_process(name, reference):
    layout = LAYOUTS[name]
    model = dict(tie_embeddings=True, qk_norm=True) if name in TIED else None
    world = layout.get("dp", 1) * layout.get("tp", 1) * layout.get("pp", 1) * layout.get("cp", 1)
    got = spawn(world, run_steps, make_cfg(layout, model))
    want = reference["tied_qk" if name in TIED else "untied"]
    assert abs(got["losses"][0] - want["losses"][0]) < 1e-5
    assert set(got["grads"]) == set(want["grads"])
    for n, g in want["grads"].items():
        assert (got["grads"][n] - g).abs().max() < 1e-4, n
    for n, p in want["params"].items():
        assert (got["params"][n] - p).abs().max() < 1e-4, n
    assert max(abs(a - b) for a, b in zip(got["losses"], want["losses"])) < 1e-4


def test_recompute_equals_plain_backward(reference):
    """Per-block activation recomputation changes memory, not numbers."""
    got = run_steps(make_cfg(dict(recompute=True)))
    want = reference["untied"]
    assert got["losses"] == want["losses"]
    for n, g in want["grads"].items():
        assert torch.equal(got["grads"][n], g), n


def test_bucketed_all_reduce_starts_before_backward_ends():
    got = spawn(2, _record_backward_events)
    launches = [i for i, e in enumerate(got) if e[0] == "launch"]
    embedding = got.index(("embedding grad ready",))
    assert len(launches) > 2 and launches[0] < embedding  # the first reduction overlaps backward


def _record_backward_events():
    cfg = make_cfg(dict(dp=2))
    grid = parallel.make_grid(cfg.parallel, cfg.model, cfg.data)
    model = Transformer(cfg.model)
    dp = parallel.DataParallel(model, grid, bucket_mb=0.004)
    # The embedding's gradient is the last one backward produces.
    model.embed.weight.register_post_accumulate_grad_hook(lambda p: dp.events.append(("embedding grad ready",)))
    x, y = global_batches(0)[0]
    parallel.forward_backward(model, grid, dp, [(x[:2], y[:2])], cfg.parallel)
    return dp.events


@pytest.mark.parametrize("layout, world, message", [
    (dict(tp=2), 3, r"parallel.dp=auto x parallel.pp=1 x parallel.cp=1 x parallel.tp=2 does not match the world "
                    r"size of 3 processes"),
    (dict(dp=2, tp=2), 2, r"parallel.dp=2 x .* x parallel.tp=2 does not match the world size of 2"),
    (dict(tp=3), 3, r"model.n_heads=4 is not divisible by parallel.tp=3"),
    (dict(pp=5), 5, r"model.n_layers=4 is fewer than parallel.pp=5 stages"),
    (dict(cp=3), 3, r"data.seq_len=16 is not divisible by 2 x parallel.cp=6"),
    (dict(tp=4), 4, r"model.n_kv_heads=2 is not divisible by parallel.tp=4"),
    (dict(pp=2, microbatches=3), 2, r"data.micro_batch=4 is not divisible by parallel.microbatches=3"),
])
def test_invalid_layout_is_named(layout, world, message):
    cfg = make_cfg(layout)
    with pytest.raises(ValueError, match=message):
        parallel.check_layout(cfg.parallel, cfg.model, cfg.data, world)


def test_an_odd_sequence_length_is_fine_without_context_parallelism():
    cfg = make_cfg({})
    assert parallel.check_layout(cfg.parallel, cfg.model, dataclasses.replace(cfg.data, seq_len=15), 1) == 1


# ----------------------------------------------------------------------------------------
# Checkpoints are consolidated: save under tp2 x pp2, resume under dp4 and under one process.

def _train(cfg, resume=None):
    train.train(cfg, resume)


def _losses(run_dir, key="loss"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if key in r and "event" not in r}


def test_checkpoint_resumes_under_another_layout(tiny_config, tmp_path):
    base = dict(checkpoint=dict(every=3), optim=dict(steps=5), model=dict(n_layers=4, tie_embeddings=True))
    saved = tiny_config(parallel=dict(tp=2, pp=2), **base)
    spawn(4, _train, saved)
    want = _losses(saved.log.dir)
    ckpt = os.path.join(saved.log.dir, "checkpoints", "step_0000003")
    dp4 = tiny_config(parallel=dict(dp=4), data=dict(micro_batch=1), log=dict(dir=str(tmp_path / "dp4")), **base)
    spawn(4, _train, dp4, ckpt)
    single = tiny_config(log=dict(dir=str(tmp_path / "one")), **base)
    train.train(single, ckpt)
    for run in (dp4, single):
        got = _losses(run.log.dir)
        assert sorted(got) == [4, 5]
        assert abs(got[4] - want[4]) < 1e-5 and abs(got[5] - want[5]) < 1e-4
        # Validation through the tp2 x pp2 pipeline equals validation of the same weights elsewhere.
        assert abs(_losses(run.log.dir, "val_loss")[5] - _losses(saved.log.dir, "val_loss")[5]) < 1e-4
