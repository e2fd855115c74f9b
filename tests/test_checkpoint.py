"""Fault tolerance: training that is killed, preempted, fed bad batches or denied its disk
finishes with the losses of a run that never was — on one process and on two (dp2)."""
import json
import os
import random
import signal
import subprocess
import time

import pytest
import torch
from conftest import ROOT, spawn, train_command

from config import to_toml
import checkpoint
import data
import model
import train

STEPS = 30


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r and "event" not in r}


def events(run_dir, kind=None):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "event" in r and (kind is None or r["event"] == kind)]


def config(tiny_config, tmp_path, name, nproc, **sections):
    """A tiny run on nproc processes (dp = nproc) with the same global batch of 4."""
    sections = {"checkpoint": dict(every=4, keep=10), "optim": dict(steps=STEPS), **sections}
    sections["data"] = {"micro_batch": 4 // nproc, **sections.get("data", {})}
    sections["log"] = {"dir": str(tmp_path / name), "every": 1}
    cfg = tiny_config(**sections)
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(cfg))
    return cfg, path


def run(path, nproc, *extra, check=True):
    r = subprocess.run(train_command(path, nproc, *extra), cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def start(path, nproc, *extra):
    return subprocess.Popen(train_command(path, nproc, *extra), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_step(cfg, proc, step):
    path = os.path.join(cfg.log.dir, "metrics.jsonl")
    while proc.poll() is None:
        if os.path.exists(path) and max(losses(cfg.log.dir), default=0) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"training ended before step {step}: {proc.stdout.read()[-2000:]}")


@pytest.fixture(scope="module")
def straight():
    """The uninterrupted runs' losses by number of processes, computed once when first needed."""
    return {}


def uninterrupted(straight, tiny_config, tmp_path, nproc):
    if nproc not in straight:
        _, path = config(tiny_config, tmp_path, f"straight{nproc}", nproc)
        run(path, nproc)
        straight[nproc] = losses(str(tmp_path / f"straight{nproc}"))
    return straight[nproc]


@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_9_then_resume_auto_equals_uninterrupted(nproc, straight, tiny_config, tmp_path):
    want = uninterrupted(straight, tiny_config, tmp_path, nproc)
    cfg, path = config(tiny_config, tmp_path, "killed", nproc)
    kill_at = random.randint(5, STEPS - 8)
    proc = start(path, nproc, "--resume", "auto")
    wait_for_step(cfg, proc, kill_at)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process tree, as a node failure would
    proc.wait()
    assert max(losses(cfg.log.dir)) < STEPS, "killed too late to test anything"
    run(path, nproc, "--resume", "auto")
    got = losses(cfg.log.dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == want[s] for s in got), f"killed at step >= {kill_at}"


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_checkpoints_exits_75_and_resumes_exactly(nproc, straight, tiny_config, tmp_path):
    want = uninterrupted(straight, tiny_config, tmp_path, nproc)
    cfg, path = config(tiny_config, tmp_path, "preempted", nproc)
    proc = start(path, nproc, "--resume", "auto")
    wait_for_step(cfg, proc, 6)
    os.killpg(proc.pid, signal.SIGTERM)  # Slurm signals every process of the job step
    out = proc.communicate()[0]
    # One process exits with the distinct code; torchrun, signalled too, stops its workers
    # (they finish the checkpoint first) and exits non-zero.
    assert proc.returncode == (train.EXIT_PREEMPTED if nproc == 1 else 1), out[-3000:]
    (preempted,) = events(cfg.log.dir, "preempted")
    assert preempted["signal"] == "SIGTERM" and preempted["checkpoint_error"] is None
    ckpt = os.path.join(cfg.log.dir, "checkpoints", f"step_{preempted['step']:07d}")
    checkpoint.verify_checkpoint(ckpt)
    assert preempted["step"] < STEPS
    run(path, nproc, "--resume", "auto")
    got = losses(cfg.log.dir)
    assert sorted(got) == list(range(1, STEPS + 1)) and all(got[s] == want[s] for s in got)


@pytest.mark.parametrize("nproc", [1, 2])
def test_corrupt_and_truncated_checkpoints_are_named_and_skipped(nproc, straight, tiny_config, tmp_path):
    want = uninterrupted(straight, tiny_config, tmp_path, nproc)
    cfg, path = config(tiny_config, tmp_path, "damaged", nproc, optim=dict(steps=12))
    run(path, nproc)
    ckpts = os.path.join(cfg.log.dir, "checkpoints")
    corrupt = os.path.join(ckpts, "step_0000012", "model-00000.safetensors")
    with open(corrupt, "r+b") as f:  # flip one byte in the middle of the weights
        f.seek(os.path.getsize(corrupt) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    truncated = os.path.join(ckpts, "step_0000008", "optimizer-00000.safetensors")
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) - 100)
    _, path = config(tiny_config, tmp_path, "damaged", nproc)  # now to the full length
    r = run(path, nproc, "--resume", "auto")
    assert f"{corrupt}: size or sha256 differs" in r.stdout and f"{truncated}: size or sha256 differs" in r.stdout
    assert "resumed from" in r.stdout and "step_0000004" in r.stdout
    got = losses(cfg.log.dir)
    assert all(got[s] == want[s] for s in range(5, STEPS + 1))


def failing_sha256(step, real=checkpoint.file_sha256):
    """sha256 that fails for the files of one checkpoint: its writer dies part-way, after the
    tensors are written and before the manifest."""
    def sha256(path):
        if f"step_{step:07d}" in path:
            raise OSError(28, "No space left on device (simulated)")
        return real(path)
    return sha256


def _train_with_failing_write(cfg):
    checkpoint.file_sha256 = failing_sha256(8)
    train.train(cfg)


@pytest.mark.parametrize("nproc", [1, 2])
def test_failed_write_keeps_earlier_checkpoints_and_is_reported(nproc, tiny_config, tmp_path, monkeypatch):
    cfg, _ = config(tiny_config, tmp_path, "diskfull", nproc, optim=dict(steps=14))
    if nproc == 1:
        monkeypatch.setattr(checkpoint, "file_sha256", failing_sha256(8))
        train.train(cfg)
    else:
        spawn(2, _train_with_failing_write, cfg)
    ckpts = os.path.join(cfg.log.dir, "checkpoints")
    assert not os.path.exists(os.path.join(ckpts, "step_0000008"))
    for step in (4, 12, 14):
        checkpoint.verify_checkpoint(os.path.join(ckpts, f"step_{step:07d}"))
    (failed,) = events(cfg.log.dir, "checkpoint_failed")
    assert failed["step"] >= 8 and "No space left on device" in failed["error"]
    assert max(losses(cfg.log.dir)) == 14


# ----------------------------------------------------------------------------------------
# Bad batches: a NaN skips one update; a run of spikes rolls back once and skips the batches.

POISON = {(0, 6 * 4): "nan", (0, 12 * 4): "spike", (0, 13 * 4): "spike", (0, 14 * 4): "spike"}


def _poisoned_train(cfg):
    """Batches at the POISON positions (epoch, window) are filled with token 0 or 1. The
    embedding of an all-0 batch is NaN, so its loss and every gradient are (as after a
    corrupt sample or an overflow); an all-1 batch's final hidden states are scaled by 30,
    so its loss is a real spike, backpropagated like any other."""
    next_batch, embed, head = data.Loader.next_batch, torch.nn.Embedding.forward, model.LMHead.forward
    seen = {}

    def poisoned_next_batch(self):
        x, y = next_batch(self)
        kind = POISON.get(self.last_batch)
        return (x.fill_(0) if kind == "nan" else x.fill_(1) if kind == "spike" else x), y

    def poisoned_embed(self, ids):
        seen["kind"] = "nan" if bool((ids == 0).all()) else "spike" if bool((ids == 1).all()) else None
        return embed(self, ids) * (float("nan") if seen["kind"] == "nan" else 1.0)

    def poisoned_head(self, h, targets=None, ignore_index=-100, per_token=False):
        return head(self, h * 30 if seen.get("kind") == "spike" else h, targets, ignore_index, per_token)

    data.Loader.next_batch, torch.nn.Embedding.forward, model.LMHead.forward = \
        poisoned_next_batch, poisoned_embed, poisoned_head
    try:
        train.train(cfg)
    finally:
        data.Loader.next_batch, torch.nn.Embedding.forward, model.LMHead.forward = next_batch, embed, head


@pytest.mark.parametrize("nproc", [1, 2])
def test_nan_is_skipped_and_spikes_roll_back_once(nproc, tiny_config, tmp_path):
    cfg, _ = config(tiny_config, tmp_path, "spiky", nproc, optim=dict(steps=24),
                    checkpoint=dict(every=10, keep=10),
                    train=dict(spike_factor=3.0, spike_window=4, max_spikes=3))
    if nproc == 1:
        _poisoned_train(cfg)
    else:
        spawn(2, _poisoned_train, cfg)
    (nan,) = events(cfg.log.dir, "skip_nonfinite")
    assert nan["step"] == 7 and nan["batches"] == [[0, 24]]
    spikes = events(cfg.log.dir, "skip_spike")
    assert [e["step"] for e in spikes] == [13, 14, 15]
    (rollback,) = events(cfg.log.dir, "rollback")
    assert rollback["from_step"] == 15 and rollback["step"] == 10
    assert rollback["skipped_batches"] == [[0, 48], [0, 52], [0, 56]]
    final = losses(cfg.log.dir)
    assert max(final) == 24 and all(torch.isfinite(torch.tensor(v)) for v in final.values())
    assert nan["loss"] != nan["loss"] and spikes[0]["loss"] > 3 * final[12]  # a real NaN, a real spike
    _, weights = checkpoint.load_model(checkpoint.step_dirs(os.path.join(cfg.log.dir, "checkpoints"))[-1])
    assert all(bool(p.isfinite().all()) for p in weights.parameters())  # the NaN gradients never landed


# ----------------------------------------------------------------------------------------
# Asynchronous checkpoints are the synchronous ones, byte for byte: weights, optimizer state
# and tokenizer; state.json but for the wall-clock seconds it records; config.toml differs
# by the checkpoint.asynchronous switch itself (and so does its hash in manifest.json).

def _train(cfg):
    train.train(cfg)


@pytest.mark.parametrize("nproc", [1, 2])
def test_async_checkpoints_are_byte_identical_to_sync(nproc, tiny_config, tmp_path):
    dirs = {}
    for asynchronous in (False, True):
        cfg, _ = config(tiny_config, tmp_path, f"async{asynchronous}", nproc, optim=dict(steps=12),
                        checkpoint=dict(every=4, keep=10, asynchronous=asynchronous))
        train.train(cfg) if nproc == 1 else spawn(2, _train, cfg)
        dirs[asynchronous] = os.path.join(cfg.log.dir, "checkpoints")
    steps = sorted(os.listdir(dirs[False]))
    assert steps == sorted(os.listdir(dirs[True])) == ["step_0000004", "step_0000008", "step_0000012"]
    for step in steps:
        a, b = (os.path.join(dirs[k], step) for k in (False, True))
        for name in sorted(n for n in os.listdir(a) if n.endswith((".safetensors", "tokenizer.json", "index.json"))):
            assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read(), name
        states = [json.load(open(os.path.join(d, "state.json"))) for d in (a, b)]
        for s in states:
            s["counters"].pop("seconds")
        assert states[0] == states[1]


def test_retention_keeps_the_newest_and_the_permanent(tiny_config, tmp_path):
    cfg, _ = config(tiny_config, tmp_path, "retention", 1, optim=dict(steps=24),
                    checkpoint=dict(every=2, keep=2, keep_every=10))
    train.train(cfg)
    kept = sorted(os.listdir(os.path.join(cfg.log.dir, "checkpoints")))
    assert kept == ["step_0000010", "step_0000020", "step_0000022", "step_0000024"]


def test_fused_adamw_state_round_trips_as_torch_would_load_it(tiny_config, tmp_path):
    """Fused AdamW (what train.py uses on CUDA) saved and loaded through the checkpoint's
    files continues exactly like the optimizer never stopped, with `step` where torch's own
    load_state_dict puts it. On CUDA that is the GPU, which the fused kernel requires; on
    this CPU every tensor is on the CPU, so the placement itself is not exercised here."""
    import parallel
    cfg = tiny_config()
    model = checkpoint.build_model(cfg)
    named, grid = list(model.named_parameters()), parallel.Grid()
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-2, fused=True)
    x = torch.randint(0, 512, (2, 16))
    for _ in range(2):
        model(x, x).backward()
        opt.step()
    path = checkpoint.save_checkpoint(str(tmp_path), 2, checkpoint.snapshot(model, named, opt, grid, 0), {}, cfg)
    ours = torch.optim.AdamW([p for _, p in named], lr=1e-2, fused=True)
    checkpoint.load_optimizer_state(ours, named, path, grid)
    theirs = torch.optim.AdamW([p for _, p in named], lr=1e-2, fused=True)
    theirs.load_state_dict(opt.state_dict())
    for (_, p) in named:
        for key, value in theirs.state[p].items():
            got = ours.state[p][key]
            assert (got.device, got.dtype) == (value.device, value.dtype) and torch.equal(got, value), key
    model(x, x).backward()
    before = [p.detach().clone() for _, p in named]
    opt.step()
    after_opt = [p.detach().clone() for _, p in named]
    for p, b in zip(model.parameters(), before):
        p.data.copy_(b)
    ours.step()
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), after_opt))
