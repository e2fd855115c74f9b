"""train.py — pretraining: optimizer, schedule, the loop, logging, surviving faults.

    python train.py --config configs/tiny.toml [--set optim.lr=1e-3 ...] [--resume auto|latest|STEP|DIR]
    torchrun --nproc-per-node 8 train.py --config configs/x.toml
    python train.py --config configs/x.toml --estimate [--gpu H100 --mfu 0.4 --usd-per-hour 2.5]

The loop (`train`) reads top to bottom: each step is `train_step`; validation, benchmarks,
checkpoints, skipped steps and rollbacks are functions of their own over the `Run` that
`start` builds. The config is config.py's; checkpoints and model building are checkpoint.py's.
"""
import argparse
import dataclasses
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
import data
import eval as evaluation
import fused
import parallel
from config import Config, ConfigError, OptimConfig, TrainConfig, load_config, to_toml
from model import MoE, Transformer


# ----------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule

def build_optimizer(named, o: OptimConfig, device, model_cfg=None):
    """AdamW, or Muon for the hidden matrices and AdamW for the rest, over (name, tensor) pairs.
    Weight decay only on matrices of the blocks (stacked experts, the router and Mamba's
    convolution included) and the head; norm gains, embeddings and Mamba's A_log and D are not
    decayed: shrinking them toward 0 is not a useful prior (GPT-3, nanoGPT; Mamba's reference
    code); a tied head follows the embedding. Each group's "lr_scale" multiplies the schedule's
    rate (set_lr): muP's 1/width_mult for hidden matrices under AdamW, muon_lr / lr for Muon's."""
    mult = model_cfg.width_mult if model_cfg is not None else 1.0
    groups = {}
    matrices = ("proj.weight", "_proj", "router.weight", "conv1d.weight")
    for name, p in named:
        decay = name.endswith(matrices) or name == "lm_head.weight"
        hidden = decay and name != "lm_head.weight"
        muon = o.name == "muon" and hidden and p.dim() >= 2 and not name.endswith("conv1d.weight")
        key = (decay, hidden, muon)
        groups.setdefault(key, {"params": [], "weight_decay": o.weight_decay if decay else 0.0, "muon": muon,
                                "lr_scale": o.muon_lr / o.lr if muon else 1 / mult if hidden else 1.0})
        groups[key]["params"].append(p)
    if o.name == "muon":
        return Muon(list(groups.values()), o.lr, (o.beta1, o.beta2), o.eps, o.muon_momentum)
    return torch.optim.AdamW(list(groups.values()), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=device.type == "cuda")


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def newton_schulz(g, steps=5):
    """Approximately the semi-orthogonal matrix nearest g (U V^T of its SVD, batched over leading
    dimensions): a quintic Newton-Schulz iteration whose coefficients maximise the slope at 0,
    so small singular values grow fast; they end in about [0.7, 1.2], not at 1 exactly, which
    trains as well (Jordan et al. 2024, Muon; modded-nanogpt)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    x = x.mT if tall else x  # iterate on the smaller Gram matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) on the groups marked "muon": SGD momentum with Nesterov, the
    update orthogonalised (newton_schulz) and scaled by sqrt(max(1, rows / cols)) as in
    modded-nanogpt and nanochat; decoupled weight decay. AdamW (Loshchilov and Hutter 2019) on
    the others (embeddings, head, vectors). One optimizer, so one state and one checkpoint
    format: Muon's momentum is kept as exp_avg."""

    def __init__(self, groups, lr, betas, eps, momentum):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in (p for p in group["params"] if p.grad is not None):
                state, grad = self.state[p], p.grad.float()
                if not state:
                    state.update(exp_avg=torch.zeros_like(p, dtype=torch.float32), step=torch.tensor(0.0))
                    if not group["muon"]:
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                p.mul_(1 - lr * wd)
                if group["muon"]:
                    buf = state["exp_avg"].mul_(group["momentum"]).add_(grad)
                    update = newton_schulz(grad.add(buf, alpha=group["momentum"]))
                    p.add_(update.to(p.dtype), alpha=-lr * max(1.0, p.shape[-2] / p.shape[-1]) ** 0.5)
                    continue
                (beta1, beta2), t = group["betas"], state["step"].item()
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                p.addcdiv_((state["exp_avg"] / (1 - beta1 ** t)).to(p.dtype), denom.to(p.dtype), value=-lr)


def lr_at(step, o: OptimConfig):
    """Linear warmup, then cosine to min_lr, or warmup-stable-decay: constant, then a
    linear decay to min_lr over the last decay_frac of steps (MiniCPM, Hu et al. 2024;
    Hägele et al. 2024 find 20% decay matches cosine)."""
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    if o.schedule == "cosine":
        progress = min(1.0, (step - o.warmup) / max(1, o.steps - o.warmup))
        return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))
    decay_start = o.steps - int(o.decay_frac * o.steps)
    if step < decay_start:
        return o.lr
    return o.lr + (o.min_lr - o.lr) * (step - decay_start) / max(1, o.steps - decay_start)


# ----------------------------------------------------------------------------------------
# Logging, device peaks, and the --estimate calculator

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (no sparsity); first match wins.
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
              ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12), ("L4", 121e12),
              ("4090", 165e12), ("3090", 71e12)]


def peak_flops(gpu_name):
    """The dense bf16 peak of a GPU by (part of) its name, or None when unknown."""
    return next((f for key, f in PEAK_FLOPS if key.lower() in gpu_name.lower()), None)


def fmt_time(s):
    return f"{s / 3600:.1f}h" if s >= 3600 else f"{s / 60:.1f}m" if s >= 60 else f"{s:.0f}s"


class MetricsLog:
    """One line per interval on stdout and the same as JSON lines in metrics.jsonl, and its
    numbers to the tracking backends of log.backends that are installed."""

    def __init__(self, run_dir, enabled, backends="", cfg=None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        names = [b.strip() for b in backends.split(",") if b.strip()] if enabled else []
        self.trackers = [t for t in (tracker(name, run_dir, cfg) for name in names) if t]

    def rewind(self, step):
        """Drop the metrics past a checkpoint we go back to (resume, rollback): the run redoes
        those steps. Event lines (skips, rollbacks, preemptions) stay as history."""
        if self.enabled and os.path.exists(self.path):
            with open(self.path) as f:
                keep = [line for line in f if "event" in (r := json.loads(line)) or r["step"] <= step]
            with open(self.path, "w") as f:
                f.writelines(keep)

    def write(self, record, text):
        if self.enabled:
            print(text, flush=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            scalars = {k: v for k, v in record.items() if type(v) in (int, float) and k != "step"}
            for log in self.trackers:
                log(scalars, record["step"])


def tracker(name, run_dir, cfg):
    """log(scalars, step) for an experiment-tracking backend, or None with one warning when its
    package is not installed: TensorBoard (event files in RUN_DIR/tensorboard), Weights & Biases
    and MLflow (their own settings, e.g. WANDB_PROJECT, MLFLOW_TRACKING_URI, from the environment)."""
    params = {f"{s}.{k}": v for s, table in dataclasses.asdict(cfg).items() for k, v in table.items()} if cfg else {}
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

            def log(scalars, step):
                for k, v in scalars.items():
                    writer.add_scalar(k, v, step)
                writer.flush()
            return log
        if name == "wandb":
            import wandb
            name = os.path.basename(os.path.abspath(run_dir))
            run = wandb.init(dir=run_dir, name=name, config=params, resume="allow")
            return lambda scalars, step: run.log(scalars, step=step)
        import mlflow
        mlflow.start_run(run_name=os.path.basename(os.path.abspath(run_dir)))
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        return lambda scalars, step: mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=step)
    except ImportError as e:
        print(f"warning: log.backends: {name} is not installed ({e}); logging to metrics.jsonl only", file=sys.stderr)
        return None


def estimate(cfg, gpu="H100", mfu=0.4, usd_per_hour=2.5):
    """Size, compute, memory and cost of a config, printed before anything is spent; the
    figures are returned too."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    c, d, p = cfg.model, cfg.data, cfg.parallel
    n_params, n_embed = model.num_params(), model.embed.weight.numel()
    fpt = model.flops_per_token(d.seq_len)
    dp = max(p.dp, 1)
    tokens = cfg.optim.steps * d.seq_len * d.micro_batch * d.grad_accum * dp
    peak = peak_flops(gpu) or 989e12
    shard = p.tp * p.pp  # weights, grads and moments split across model-parallel ranks
    gib = 2 ** 30
    # fp32 weights, gradients and AdamW moments; ZeRO stage s shards the last s of them over dp.
    weights, grads, adam = (k * n_params / shard / (dp if p.zero >= s else 1) for k, s in ((4, 3), (4, 2), (8, 1)))
    # Activations kept for backward per layer, bf16: 34*s*b*h bytes (Korthikanti et al. 2022,
    # eq. 1 without the 5*a*s/h attention-matrix term, which flash attention never stores);
    # with per-block recomputation only the block input, 2*s*b*h.
    per_layer = (2 if p.recompute else 34) * d.seq_len * d.micro_batch * c.d_model / p.tp / p.cp
    acts = per_layer * c.n_layers / p.pp + 6 * d.seq_len * d.micro_batch * c.vocab_size / p.tp / p.cp
    gpus = dp * p.tp * p.pp * p.cp
    hours = fpt * tokens / (peak * mfu) / 3600
    memory = weights + grads + adam + acts
    rows = [
        ("parameters", f"{n_params / 1e6:,.1f}M ({(n_params - n_embed) / 1e6:,.1f}M without the embedding)"),
        ("FLOPs per token", f"{fpt / 1e9:,.2f} GFLOP (6N + attention, seq_len {d.seq_len})"),
        ("training tokens", f"{tokens / 1e9:,.3f}B ({cfg.optim.steps} steps x {tokens // cfg.optim.steps:,})"),
        ("training FLOPs", f"{fpt * tokens:.3e}"),
        ("compute-optimal", f"{20 * n_params / 1e9:,.2f}B tokens for this size, or {tokens / 20 / 1e6:,.1f}M params "
                            "for these tokens (20 tokens/param, Hoffmann et al. 2022)"),
        ("memory per GPU", f"weights {weights / gib:.2f} + grads {grads / gib:.2f} + AdamW {adam / gib:.2f} + "
                           f"activations {acts / gib:.2f} = {memory / gib:.2f} GiB"),
        ("GPU-hours", f"{hours:,.1f} on {gpu} at {mfu:.0%} MFU ({peak / 1e12:.0f} TFLOP/s peak); "
                      f"{hours / gpus:,.2f}h wall on {gpus} GPUs"),
        ("cost", f"${hours * usd_per_hour:,.0f} at ${usd_per_hour}/GPU-hour"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return {"params": n_params, "flops_per_token": fpt, "tokens": tokens, "memory_bytes": memory, "gpu_hours": hours}


# ----------------------------------------------------------------------------------------
# Surviving faults: preemption signals, loss spikes

EXIT_PREEMPTED = 75  # EX_TEMPFAIL, "try again": a restart loop or Slurm requeue resumes with --resume auto


class Preempted(Exception):
    """Raised at a step boundary after a stop signal, once the checkpoint is on disk."""


def catch_stop_signals():
    """SIGTERM and SIGUSR1 (what Slurm sends before a time limit or preemption) only set a
    flag; the loop checkpoints at the next step boundary. Returns (flag, restore)."""
    flag = {}

    def handler(signum, frame):
        flag["signal"] = signal.Signals(signum).name

    if threading.current_thread() is not threading.main_thread():
        return flag, lambda: None
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    return flag, lambda: [signal.signal(sig, h) for sig, h in previous.items()]


class SpikeGuard:
    """Decides whether a step's update is applied. A non-finite loss or gradient norm, or a
    loss above spike_factor x its running mean, skips the update (the batch is consumed);
    max_spikes skips in a row ask for a rollback to the last checkpoint (PaLM, section 5.1:
    restart before the spike and skip the batches that caused it)."""

    def __init__(self, t: TrainConfig):
        self.t, self.mean, self.seen, self.in_a_row = t, None, 0, 0

    def verdict(self, loss, grad_norm):
        """None (apply), "nonfinite" or "spike" (skip)."""
        if self.t.skip_nonfinite and not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "nonfinite"
        if self.t.spike_factor and self.seen >= self.t.spike_window and loss > self.t.spike_factor * self.mean:
            return "spike"
        return None

    def accept(self, loss):
        alpha = 2 / (self.t.spike_window + 1)  # an EMA spanning about spike_window steps
        self.mean = loss if self.mean is None else (1 - alpha) * self.mean + alpha * loss
        self.seen, self.in_a_row = self.seen + 1, 0

    def reject(self):
        self.in_a_row += 1
        return self.in_a_row >= self.t.max_spikes  # time to roll back


def world_max(flag, device):
    """The same decision on every rank: whether any rank raised its flag."""
    if not dist.is_initialized():
        return flag  # no collective, and no device sync, on one process
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def on_rank0(fn, master):
    """fn() run on rank 0 only, its result (or the error it raised) on every rank."""
    box = [None]
    if master:
        try:
            box = [(fn(), None)]
        except (ValueError, OSError) as e:
            box = [(None, e)]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error:
        raise error
    return result


# ----------------------------------------------------------------------------------------
# Starting a run: the checks, the run directory, the model and its state

def check_inputs(cfg):
    """Fail before any training on data or benchmark files that cannot serve this config."""
    shards = {**data.sources(cfg.data.train, "data.train"), **(data.sources(cfg.data.val, "data.val") if cfg.data.val
                                                                 else {})}
    data.check_shards(shards, cfg.model.vocab_size)
    if cfg.eval.every and cfg.eval.tasks:
        evaluation.load_tasks(cfg.eval.tasks, cfg.eval.limit)


def set_aside(path):
    """Rename path out of the way (path.YYYYmmdd-HHMMSS); nothing is deleted."""
    if os.path.exists(path):
        aside = f"{path}.{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(path, aside)
        print(f"moved {path} aside to {aside}", flush=True)


def prepare_run_dir(cfg, ckpt_dir, resume, start_over):
    """The checkpoint to resume from (None: a fresh start), once the run directory is fit for
    it: a fresh start never mixes with an earlier run's metrics or checkpoints."""
    for leftover in (n for n in os.listdir(ckpt_dir) if n.startswith(".tmp_")) if os.path.isdir(ckpt_dir) else ():
        shutil.rmtree(os.path.join(ckpt_dir, leftover))  # a write cut short by a crash
    start = checkpoint.resolve_resume(ckpt_dir, resume)
    metrics = os.path.join(cfg.log.dir, "metrics.jsonl")
    if not start:
        if start_over:
            for path in (metrics, os.path.join(cfg.log.dir, "report.md"), ckpt_dir):
                set_aside(path)
        elif resume == "auto":  # a restart loop's first attempt died before its first checkpoint
            set_aside(metrics)
        elif os.path.exists(metrics) or checkpoint.step_dirs(ckpt_dir):
            raise ConfigError(f"{cfg.log.dir} already holds a run (metrics.jsonl or checkpoints in {ckpt_dir}): "
                              "continue it with --resume auto, train into another log.dir, or pass --start-over "
                              "to move the old run aside")
        init = cfg.train.init_from
        if init and not os.path.exists(os.path.join(init, "config.json")):  # a training checkpoint, not HF's
            checkpoint.verify_checkpoint(init)
    os.makedirs(cfg.log.dir, exist_ok=True)
    with open(os.path.join(cfg.log.dir, "config.toml"), "w") as f:
        f.write(to_toml(cfg))
    with open(os.path.join(cfg.log.dir, "environment.jsonl"), "a") as f:  # one line per start, resumes included
        f.write(json.dumps(environment(cfg, start)) + "\n")
    return start


def environment(cfg, resumed_from):
    """What a run needs to be reproduced, besides its config: the code (git revision and
    whether the tree had uncommitted changes), the libraries and devices, and the data (a
    sha256 over every shard's name and sidecar, which hold its token count and lineage)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)), text=True,
                                  capture_output=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "numpy", "tokenizers", "safetensors"):
        versions[name] = importlib.metadata.version(name) if importlib.util.find_spec(name) else None
    digest = hashlib.sha256()
    for key, pattern in sorted({**data.sources(cfg.data.train), **data.sources(cfg.data.val, "data.val")}.items()):
        for path in data.find_shards(pattern, key) if pattern else ():
            with open(os.path.splitext(path)[0] + ".json", "rb") as f:
                digest.update(os.path.basename(path).encode() + f.read())
    status = git("status", "--porcelain")
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed_from": resumed_from,
            "git_revision": git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
            **versions, "devices": devices or [platform.processor() or "cpu"], "data_sha256": digest.hexdigest()}


@dataclass
class Run:
    """What the loop's functions share: built once by `start`; `step` and `counters` advance."""
    cfg: Config
    grid: parallel.Grid
    device: torch.device
    autocast: object
    model: torch.nn.Module
    dp: parallel.DataParallel
    named: list              # (name, tensor) pairs the optimizer updates
    optimizer: torch.optim.Optimizer
    loader: data.Loader | data.Mixture
    val_loaders: dict        # {source: Loader}; one unnamed source ("") for a plain glob
    token_bytes: torch.Tensor
    bos: int | None          # packed documents start at this token (data.doc_mask)
    log: MetricsLog
    writer: checkpoint.CheckpointWriter
    ckpt_dir: str
    master: bool
    step: int = 0
    counters: dict = field(default_factory=lambda: {"tokens": 0, "seconds": 0.0})
    last_kept: float = field(default_factory=time.time)
    extra: dict = field(default_factory=dict)  # what align.py's methods add: tokenizer, reference, reward


def setup_device(cfg, local_rank):
    t = cfg.train
    name = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    fused.set_backend(t.kernels)
    return device, autocast


def start(cfg, resume=None, start_over=False):
    """Everything a run needs, on this rank: the grid, the model (fresh from data.seed, or a
    checkpoint's), data parallelism, the optimizer, the loaders and the log."""
    rank, world, local_rank = parallel.init_distributed()
    device, autocast = setup_device(cfg, local_rank)
    d, master = cfg.data, rank == 0
    grid = parallel.make_grid(cfg.parallel, cfg.model, d)
    ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.log.dir, "checkpoints")
    begin = on_rank0(partial(prepare_run_dir, cfg, ckpt_dir, resume, start_over), master)
    model, dp, named, optimizer = build(cfg, grid, device, begin or cfg.train.init_from or None)
    # Ranks of one data-parallel slot (tp, pp and cp peers) read the same sequences.
    loader = data.make_loader(d.train, d.seq_len, d.micro_batch, grid.dp_rank, grid.dp, d.seed)
    val_loaders = {key.removeprefix("data.val").lstrip("."): data.Loader(
        pattern, d.seq_len, d.micro_batch, grid.dp_rank, grid.dp, shuffle=False, key=key)
        for key, pattern in (data.sources(d.val, "data.val") if d.val else {}).items()}
    token_bytes = torch.tensor(data.token_byte_lengths(data.tokenizer_path(d.train)), device=device)
    first_shard = data.find_shards(next(iter(data.sources(d.train).values())))[0]
    bos = data.read_sidecar(first_shard).get("bos_id") if d.doc_mask else None
    run = Run(cfg, grid, device, autocast, model, dp, named, optimizer, loader, val_loaders, token_bytes, bos,
              MetricsLog(cfg.log.dir, master, cfg.log.backends, cfg),
              checkpoint.CheckpointWriter(cfg.checkpoint.asynchronous), ckpt_dir, master)
    if begin:
        restore(run, begin, weights=False)
        run.log.rewind(run.step)
    if master:
        layout = f"dp{grid.dp} tp{grid.tp} pp{grid.pp} cp{grid.cp}" + (" sp" if grid.sequence_parallel else "") \
            + (f" zero{dp.zero}" if dp.zero else "")
        print(f"model: {whole_model_size(cfg)[0] / 1e6:.2f}M parameters, {world} process(es) ({layout}) on "
              f"{device}" + (f", resumed from {begin}" if begin else ""))
    return run


def build(cfg, grid, device, weights=None):
    """This rank's part of the model (checkpoint.build_model: fresh from data.seed, or the
    given checkpoint's weights), its data parallelism and its optimizer:
    (model, dp, [(name, tensor) the optimizer updates], optimizer)."""
    torch.manual_seed(cfg.data.seed)  # the global generator too: checkpoints save and resume its state
    zero = cfg.parallel.zero and grid.dp * grid.cp > 1  # then a rank reads only its slices, once they are cut
    model = checkpoint.build_model(cfg, device, None if zero else weights, grid)
    dp = parallel.DataParallel(model, grid, zero=cfg.parallel.zero)
    named = dp.optimizer_params(model)
    if zero and weights:
        checkpoint.load_weights(model, dp, named, weights, grid)
    if cfg.train.compile:
        model.compile()
    return model, dp, named, build_optimizer(named, cfg.optim, device, cfg.model)


def whole_model_size(cfg):
    """(parameters, training FLOPs per token) of the whole model, whatever part a rank holds."""
    with torch.device("meta"):
        whole = Transformer(cfg.model)
    return whole.num_params(), whole.flops_per_token(cfg.data.seq_len)


def restore(run, path, weights=True):
    """Put a checkpoint's weights (unless the model was just built from it), optimizer state,
    step, counters, loader position and RNG state back into the run."""
    if weights:
        checkpoint.load_weights(run.model, run.dp, run.named, path, run.grid)
    checkpoint.load_optimizer_state(run.optimizer, run.named, path, run.grid)
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    run.step, run.counters = state["step"], state["counters"]
    run.loader.load_state_dict(state["loader"])
    torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))


# ----------------------------------------------------------------------------------------
# The loop and its parts

def train_step(run, guard):
    """One optimizer step: forward and backward over grad_accum micro-batches, the global
    gradient norm and clipping, and the update unless the guard rejects it. Returns
    (loss, grad_norm, the ids of the batches, verdict)."""
    cfg = run.cfg
    set_lr(run.optimizer, lr_at(run.step, cfg.optim))
    batches, batch_ids = [], []
    for _ in range(cfg.data.grad_accum):
        batches.append(tuple(t.to(run.device, non_blocking=True) for t in run.loader.next_batch()))
        batch_ids.append(run.loader.last_batch)
    loss = parallel.forward_backward(run.model, run.grid, run.dp, batches, cfg.parallel, run.autocast, bos=run.bos)
    grad_norm = parallel.clip_grad_norm(run.named, cfg.optim.clip, run.grid, run.dp.zero)
    loss, grad_norm = loss.item(), float(grad_norm)  # the one host sync per step
    verdict = guard.verdict(loss, grad_norm)
    if verdict is None:
        run.optimizer.step()
        run.dp.after_step()
        guard.accept(loss)
    run.dp.zero_grad(run.model)
    run.step += 1
    return loss, grad_norm, batch_ids, verdict


def log_step(run, loss, grad_norm, dt, tokens_per_step, flops_per_token, peak):
    cfg, step = run.cfg, run.step
    rec = {"step": step, "loss": loss, "lr": lr_at(step - 1, cfg.optim), "grad_norm": grad_norm,
           "tokens_per_s": tokens_per_step / dt, "tokens": run.counters["tokens"], "elapsed_s": run.counters["seconds"]}
    world = dist.get_world_size() if dist.is_initialized() else 1
    mfu = f" | mfu {flops_per_token * tokens_per_step / dt / (peak * world):.1%}" if peak else ""
    eta = fmt_time(run.counters["seconds"] / step * (cfg.optim.steps - step))
    if isinstance(run.loader, data.Mixture):  # tokens and epochs per source
        epochs = run.loader.epochs()
        rec.update({f"tokens/{n}": w * cfg.data.seq_len for n, w in run.loader.windows.items()})
        rec.update({f"epochs/{n}": e for n, e in epochs.items()})
    moe = router_stats(run.model, cfg.model.moe_experts, next(run.model.parameters()).device)
    rec.update(moe)
    moe_text = (f" | router balance {moe['moe_balance']:.3f} z {moe['moe_z_loss']:.2f} | expert load "
                f"{min(moe['moe_load']):.2f}-{max(moe['moe_load']):.2f} | dropped {moe['moe_dropped']:.1%}"
                if moe else "")
    run.log.write(rec, f"step {step:>6}/{cfg.optim.steps} | loss {loss:.4f} | lr {rec['lr']:.2e} | grad "
                       f"{grad_norm:.3f}{moe_text} | {rec['tokens_per_s'] / 1e3:.1f}k tok/s{mfu} | eta {eta}")
    for name, e in (epochs.items() if isinstance(run.loader, data.Mixture) else ()):
        if int(e) > run.counters.setdefault("epochs_reported", {}).get(name, 0):
            run.counters["epochs_reported"][name] = int(e)
            run.log.write({"step": step, "event": "repeat", "source": name, "epoch": int(e) + 1},
                          f"step {step:>6} | source {name} starts epoch {int(e) + 1}: its data repeats (up to about 4 "
                          "epochs is worth nearly as much as new data, Muennighoff et al. 2023; past that, less)")


def router_stats(model, n_experts, device):
    """The MoE routers since the last log, over every layer and rank: the mean balance loss
    (1: even) and z-loss, each expert's share of the token choices times E (1: even) and the
    share of choices dropped at capacity. Every rank calls it (one all-reduce)."""
    if not n_experts:
        return {}
    total = torch.zeros(4 + n_experts, device=device)
    for m in model.modules():
        if isinstance(m, MoE) and m.stats is not None:
            total += m.stats.to(device)
            m.stats = None
    if dist.is_initialized():
        dist.all_reduce(total)
    (balance, z, dropped, n), counts = total[:4].tolist(), total[4:]
    share = counts / counts.sum().clamp(min=1)
    return {"moe_balance": balance / max(n, 1), "moe_z_loss": z / max(n, 1),
            "moe_load": [round(x, 4) for x in (share * n_experts).tolist()],
            "moe_dropped": dropped / max(counts.sum().item(), 1)}


def validate(run):
    """Validation loss and bits per byte on the same val_batches windows every time, per
    source of a mixture (val_loss/NAME) and their mean (val_loss)."""
    if not run.val_loaders:
        return
    rec, parts = {"step": run.step}, []
    for name, loader in run.val_loaders.items():
        loader.load_state_dict({**loader.state_dict(), "epoch": 0, "pos": 0})
        loss, bpb = evaluation.loss_and_bpb(
            lambda x, y: parallel.forward_backward(run.model, run.grid, run.dp, [(x, y)], run.cfg.parallel,
                                                   run.autocast, backward=False, bos=run.bos),
            loader, run.cfg.eval.val_batches, run.token_bytes, run.grid.groups.get("dp"))
        rec.update({f"val_loss/{name}": loss, f"val_bpb/{name}": bpb} if name else {})
        parts.append((name, loss, bpb))
    rec.update(val_loss=statistics.fmean(p[1] for p in parts), val_bpb=statistics.fmean(p[2] for p in parts))
    run.log.write(rec, f"step {run.step:>6} | val loss {rec['val_loss']:.4f} | val bpb {rec['val_bpb']:.4f}"
                  + "".join(f" | {n} {loss:.4f}" for n, loss, _ in parts if n))


def benchmark(run):
    """eval.py's benchmarks in the training layout, through validation's forward: every rank
    scores every request, one sequence at a time (so data-parallel ranks agree and a pipeline
    takes it as one micro-batch), padded to a length that cp and sequence parallelism cut evenly."""
    grid = run.grid
    multiple = math.lcm(2 * grid.cp if grid.cp > 1 else 1, grid.tp if grid.sequence_parallel else 1)
    pcfg = dataclasses.replace(run.cfg.parallel, microbatches=0)

    def loss_fn(x, y):
        x, y = F.pad(x, (0, -x.shape[1] % multiple)), F.pad(y, (0, -y.shape[1] % multiple), value=-100)
        return parallel.forward_backward(run.model, grid, run.dp, [(x.to(run.device), y.to(run.device))], pcfg,
                                         run.autocast, backward=False)
    limit = run.cfg.model.max_seq_len // multiple * multiple
    run.log.write(*evaluation.monitor(run.cfg.eval, data.tokenizer_path(run.cfg.data.train), loss_fn, limit, run.step))


def save(run):
    """Snapshot the pieces this rank owns to CPU memory (the only part training waits for when
    asynchronous) and hand the write to the writer: every rank writes its own."""
    t0 = time.perf_counter()
    report_failed_write(run, block=True)  # one write in flight at a time
    pieces = checkpoint.snapshot(run.model, run.named, run.optimizer, run.grid, run.dp.zero)
    state = {"step": run.step, "counters": dict(run.counters), "loader": run.loader.state_dict(),
             "rng": torch.get_rng_state().tolist()}
    keep = run.cfg.checkpoint
    permanent = bool(keep.keep_every and run.step % keep.keep_every == 0) or \
        bool(keep.keep_hours and time.time() - run.last_kept >= keep.keep_hours * 3600)
    run.last_kept = time.time() if permanent else run.last_kept
    rank = dist.get_rank() if dist.is_initialized() else 0
    run.writer.submit(partial(checkpoint.save_checkpoint, run.ckpt_dir, run.step, pieces, state, run.cfg, permanent,
                              rank, run.grid.groups.get("ckpt")))
    stall = time.perf_counter() - t0
    run.log.write({"step": run.step, "event": "checkpoint", "stall_s": stall, "asynchronous": run.writer.asynchronous},
                  f"step {run.step:>6} | checkpoint {'queued' if run.writer.asynchronous else 'written'}, "
                  f"training stalled {stall:.2f}s")


def report_failed_write(run, block=False):
    error = run.writer.wait() if block or not run.writer.busy() else None
    if error:
        run.log.write({"step": run.step, "event": "checkpoint_failed", "error": str(error)},
                      f"step {run.step:>6} | checkpoint write FAILED, earlier checkpoints are intact: {error}")


def roll_back(run, bad_batches):
    """Back to the newest good checkpoint, replaying from there without the bad batches."""
    run.writer.wait()
    path = on_rank0(partial(checkpoint.newest_good_checkpoint, run.ckpt_dir, before=run.step), run.master)
    if path is None:
        run.log.write({"step": run.step, "event": "rollback_impossible"},
                      f"step {run.step:>6} | {len(bad_batches)} bad steps in a row, no checkpoint to roll back to")
        return
    skip, from_step = run.loader.skip | set(bad_batches), run.step
    restore(run, path)
    run.loader.skip |= skip
    run.log.rewind(run.step)
    run.log.write({"step": run.step, "event": "rollback", "from_step": from_step, "skipped_batches": sorted(skip)},
                  f"step {run.step:>6} | rolled back from step {from_step} to {path}, "
                  f"skipping {len(skip)} batch(es) from now on")


def preempt(run, signal_name):
    """Checkpoint, wait for the write, and leave with EXIT_PREEMPTED."""
    save(run)
    error = run.writer.wait()
    run.log.write({"step": run.step, "event": "preempted", "signal": signal_name,
                   "checkpoint_error": str(error) if error else None},
                  f"step {run.step:>6} | {signal_name}: checkpointed, exiting with code {EXIT_PREEMPTED}")
    raise Preempted(signal_name)


def train(cfg, resume=None, start_over=False):
    run = start(cfg, resume, start_over)
    o, every = cfg.optim, lambda n: n and run.step % n == 0 and run.step < o.steps
    n_params, flops_per_token = whole_model_size(cfg)
    grid, d = run.grid, cfg.data
    tokens_per_step = d.seq_len * d.micro_batch * d.grad_accum * grid.dp
    peak = peak_flops(torch.cuda.get_device_name(run.device)) if run.device.type == "cuda" else None
    guard, (stop, restore_signals) = SpikeGuard(cfg.train), catch_stop_signals()
    try:
        bad_batches = []  # of the skipped steps since the last applied update
        while run.step < o.steps:
            if world_max("signal" in stop, run.device):
                preempt(run, stop.get("signal", "a peer rank's signal"))
            t0 = time.perf_counter()
            loss, grad_norm, batch_ids, verdict = train_step(run, guard)
            dt = time.perf_counter() - t0
            run.counters["tokens"] += tokens_per_step
            run.counters["seconds"] += dt
            if verdict:
                bad_batches += batch_ids
                run.log.write({"step": run.step, "event": f"skip_{verdict}", "loss": loss, "grad_norm": grad_norm,
                               "batches": batch_ids}, f"step {run.step:>6} | skipped the update: {verdict} loss "
                                                      f"{loss:.4f}, grad {grad_norm:.3f}, batches {batch_ids}")
                if guard.reject():
                    roll_back(run, bad_batches)
                    guard.in_a_row, bad_batches = 0, []
                continue
            bad_batches = []
            if run.step % cfg.log.every == 0 or run.step == o.steps:
                log_step(run, loss, grad_norm, dt, tokens_per_step, flops_per_token, peak)
            if every(cfg.eval.val_every):
                validate(run)
            if cfg.eval.every and run.step % cfg.eval.every == 0:
                benchmark(run)
            if every(cfg.checkpoint.every):
                save(run)
            report_failed_write(run)
        validate(run)
        save(run)
        error = run.writer.wait()
        if error:
            raise RuntimeError(f"the final checkpoint could not be written: {error}") from error
    finally:
        restore_signals()
        run.writer.wait()
    if run.master:
        write_report(cfg, n_params)
    if dist.is_initialized():
        dist.barrier()
    return run.model


def write_report(cfg, n_params):
    """report.md in the run directory: a one-page card of the run. Later stages (eval,
    alignment, inference) append their own sections."""
    with open(os.path.join(cfg.log.dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train_recs = [r for r in records if "loss" in r and "event" not in r]
    val_recs = [r for r in records if "val_loss" in r]
    stats_path = os.path.join(os.path.dirname(data.tokenizer_path(cfg.data.train)), "stats.json")
    lines = ["# Run report", "", f"Run directory `{cfg.log.dir}`, {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            s = json.load(f)
        lines += ["## Data", "",
                  f"- corpus: {s['train']['documents'] + s['val']['documents']:,} documents, "
                  f"{(s['train']['bytes'] + s['val']['bytes']) / 1e6:.1f} MB of text",
                  f"- tokens: {s['train']['tokens']:,} train, {s['val']['tokens']:,} val",
                  f"- tokenizer: vocab {cfg.model.vocab_size:,}, {s['bytes_per_token']:.2f} bytes per token", ""]
    last = train_recs[-1]
    lines += ["## Training", "",
              f"- model: {n_params / 1e6:.2f}M parameters, {cfg.model.n_layers} layers, "
              f"d_model {cfg.model.d_model}, {cfg.model.n_heads} heads ({cfg.model.n_kv_heads} KV)",
              f"- {last['step']} steps, {last['tokens']:,} tokens in {fmt_time(last['elapsed_s'])} "
              f"({last['tokens'] / last['elapsed_s'] / 1e3:.1f}k tokens/s)",
              f"- train loss {train_recs[0]['loss']:.3f} (step {train_recs[0]['step']}) -> "
              f"{last['loss']:.3f} (step {last['step']})"]
    if any(k.startswith("epochs/") for k in last):
        lines.append("- mixture: " + ", ".join(f"{k[7:]} {last['tokens/' + k[7:]]:,} tokens ({v:.2f} epochs)"
                                               for k, v in last.items() if k.startswith("epochs/")))
    if val_recs:
        lines.append(f"- validation: loss {val_recs[-1]['val_loss']:.3f}, "
                     f"{val_recs[-1]['val_bpb']:.3f} bits per byte" + "".join(
                         f"; {k[9:]} {v:.3f}" for k, v in val_recs[-1].items() if k.startswith("val_loss/")))
    with open(os.path.join(cfg.log.dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--resume", nargs="?", const="latest",
                   help="auto (newest good checkpoint, or a fresh start: safe in a restart loop), latest (default; "
                        "an error if there is none), a step number, or a directory")
    p.add_argument("--start-over", action="store_true",
                   help="train afresh into a log.dir that holds a run, moving its metrics and checkpoints aside")
    p.add_argument("--estimate", action="store_true", help="print size, FLOPs, memory and cost, then exit")
    p.add_argument("--gpu", default="H100")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--usd-per-hour", type=float, default=2.5)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.estimate:
            estimate(cfg, args.gpu, args.mfu, args.usd_per_hour)
            return
        check_inputs(cfg)
        train(cfg, args.resume, args.start_over)
    except Preempted:
        sys.exit(EXIT_PREEMPTED)
    except (ValueError, OSError) as e:  # bad input: one line, once, naming what to fix
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            gc.collect()  # free the model's cycles (gradient hooks, partials) that hold gloo/NCCL groups first
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
