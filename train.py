"""train.py — pretraining: config, optimizer, schedule, the loop, checkpoints, logging.

    python train.py --config configs/tiny.toml [--set optim.lr=1e-3 ...] [--resume latest|STEP|DIR]
    torchrun --nproc-per-node 8 train.py --config configs/x.toml
    python train.py --config configs/x.toml --estimate [--gpu H100 --mfu 0.4 --usd-per-hour 2.5]
"""
import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

import data
import eval as evaluation
import kernels
import parallel
from model import ModelConfig, Transformer, init_parameter


# ----------------------------------------------------------------------------------------
# Config: TOML sections -> nested dataclasses, checked key by key.

def choice(default, *choices):
    return field(default=default, metadata={"choices": (default, *choices)})


@dataclass
class DataConfig:
    train: str = ""             # glob of token shards, e.g. "runs/demo/tokens/train_*.bin"
    val: str = ""
    seq_len: int = 256
    micro_batch: int = 8        # sequences per rank per micro-step
    grad_accum: int = 1         # micro-steps per optimizer step
    seed: int = 1337            # data order and weight initialisation


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0           # max global gradient norm; 0 disables clipping
    warmup: int = 100
    steps: int = 1000
    schedule: str = choice("cosine", "wsd")
    decay_frac: float = 0.2     # wsd: fraction of steps spent decaying to min_lr


@dataclass
class ParallelConfig:
    dp: int = 0                 # 0: the world size divided by tp * pp * cp
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    pp_schedule: str = choice("1f1b", "afab")
    microbatches: int = 0
    recompute: bool = False


@dataclass
class CheckpointConfig:
    dir: str = ""               # "" : <log.dir>/checkpoints
    every: int = 0              # steps between checkpoints; 0: only at the end
    keep: int = 3               # most recent checkpoints kept
    keep_every: int = 0         # also keep every checkpoint at a multiple of this many steps, forever
    keep_hours: float = 0.0     # also keep one checkpoint per this many hours of training, forever
    asynchronous: bool = True   # write from a CPU snapshot on a background thread while training goes on


@dataclass
class LogConfig:
    dir: str = "runs/default"   # the run directory: config, metrics.jsonl, report.md
    every: int = 10


@dataclass
class EvalConfig:
    every: int = 0              # benchmark tasks (eval.py) every N steps; 0: never
    tasks: str = ""             # "hellaswag=path.jsonl,arc_easy=path.jsonl" (eval.py --tasks)
    limit: int = 200            # a fixed random subset of N examples per task; 0: all
    mode: str = choice("norm", "pmi", "letter")  # cloze (norm), cloze + PMI, or A/B/C/D letters
    shots: int = 0
    val_every: int = 100        # validation loss every N steps (and at the end); 0: only at the end
    val_batches: int = 10


@dataclass
class TrainConfig:
    device: str = "auto"        # auto: cuda when available, else cpu
    dtype: str = choice("auto", "float32", "bfloat16")  # auto: bf16 autocast on cuda, fp32 on cpu
    kernels: str = choice("auto", "torch", "triton")
    compile: bool = False
    skip_nonfinite: bool = True  # a NaN/inf loss or gradient norm skips the update instead of applying it
    spike_factor: float = 0.0   # a loss above this x its running mean skips the update; 0: off
    spike_window: int = 20      # steps of running mean (and of warm-up before spikes are judged)
    max_spikes: int = 3         # consecutive skipped steps that roll back to the last checkpoint


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(ValueError):
    pass


def _check_value(key, f, value):
    """The value for dataclass field f, or a ConfigError naming key."""
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str)}[f.type]
    if not ok(value):
        raise ConfigError(f"{key} = {value!r}: expected {f.type.__name__}, got {type(value).__name__}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key} = {value!r}: choose one of {', '.join(map(repr, choices))}")
    return float(value) if f.type is float else value


def config_from_dict(d, where="config"):
    sections = {f.name: f for f in dataclasses.fields(Config)}
    built = {}
    for name, table in d.items():
        if name not in sections:
            raise ConfigError(f"{where}: unknown section [{name}]; valid: {', '.join(sections)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
        cls = sections[name].type
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in table.items():
            if key not in fields:
                raise ConfigError(f"{where}: unknown key {name}.{key}; valid keys of [{name}]: {', '.join(fields)}")
            kwargs[key] = _check_value(f"{where}: {name}.{key}", fields[key], value)
        try:
            built[name] = cls(**kwargs)
        except ValueError as e:  # ModelConfig's own checks
            raise ConfigError(f"{where}: {e}") from None
    cfg = Config(**built)
    if cfg.data.seq_len > cfg.model.max_seq_len:  # the RoPE tables hold max_seq_len positions
        raise ConfigError(f"{where}: data.seq_len = {cfg.data.seq_len} is longer than model.max_seq_len = "
                          f"{cfg.model.max_seq_len}")
    return cfg


def apply_override(d, assignment):
    """'section.key=value' into the nested dict d; value parsed as a TOML value, else a string."""
    key, sep, raw = assignment.partition("=")
    if not sep or key.count(".") != 1:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    section, name = key.split(".")
    d.setdefault(section, {})[name] = value


def load_config(path, overrides=()):
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    for assignment in overrides:
        apply_override(d, assignment)
    return config_from_dict(d, where=path)


def to_toml(cfg):
    """The resolved config as TOML text (saved in every run directory and checkpoint)."""
    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()
    lines = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        for k, v in dataclasses.asdict(getattr(cfg, section.name)).items():
            lines.append(f"{k} = {value(v)}")
        lines.append("")
    return "\n".join(lines)


def check_data_paths(cfg):
    """Fail before any training if a shard pattern matches nothing or a benchmark file of
    eval.tasks is missing or malformed."""
    data.find_shards(cfg.data.train, "data.train")
    if cfg.data.val:
        data.find_shards(cfg.data.val, "data.val")
    if cfg.eval.every and cfg.eval.tasks:
        evaluation.load_tasks(cfg.eval.tasks, cfg.eval.limit)


# ----------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule

def build_optimizer(named, o: OptimConfig, device):
    """AdamW over (name, tensor) pairs; weight decay only on matrices of the blocks and the
    head. Norm gains and embeddings are not decayed: shrinking them toward 0 is not a
    useful prior (GPT-3, nanoGPT); a tied head is the embedding and follows it."""
    decay, no_decay = [], []
    for name, p in named:
        (decay if name.endswith("proj.weight") or name == "lm_head.weight" else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=device.type == "cuda")


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
# Checkpoints: one directory per step, written under a temporary name and renamed.
#   step_0000100/model.safetensors      consolidated fp32 weights (model.py names)
#               /optimizer.safetensors  AdamW moments per parameter name: NAME.exp_avg, ...
#               /state.json             step, loader position, RNG, counters
#               /config.toml            the resolved config
#               /manifest.json          size and sha256 of every file above

def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def step_dirs(ckpt_dir):
    """Finished checkpoints, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(os.path.join(ckpt_dir, d) for d in os.listdir(ckpt_dir) if d.startswith("step_"))


def save_checkpoint(ckpt_dir, step, weights, moments, state, cfg, permanent=False):
    """Write full (consolidated) tensors and state as step_NNNNNNN, atomically: files go to
    a temporary directory that is renamed only once the manifest is written. Then drop old
    checkpoints beyond the newest checkpoint.keep, except permanent ones."""
    from safetensors.torch import save_file
    final = os.path.join(ckpt_dir, f"step_{step:07d}")
    tmp = os.path.join(ckpt_dir, f".tmp_step_{step:07d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({n: t.float().contiguous() for n, t in weights.items()}, os.path.join(tmp, "model.safetensors"))
    save_file({n: t.contiguous() for n, t in moments.items()}, os.path.join(tmp, "optimizer.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f)
    with open(os.path.join(tmp, "config.toml"), "w") as f:
        f.write(to_toml(cfg))
    tokenizer = data.tokenizer_path(cfg.data.train)
    shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.json"))  # the checkpoint serves on its own
    files = {n: {"bytes": os.path.getsize(os.path.join(tmp, n)), "sha256": sha256(os.path.join(tmp, n))}
             for n in sorted(os.listdir(tmp))}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump({"step": step, "keep": permanent, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in step_dirs(ckpt_dir)[:-cfg.checkpoint.keep or None]:
        if not read_manifest(old).get("keep"):
            shutil.rmtree(old)
    return final


def read_manifest(path):
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def verify_checkpoint(path):
    """Raise if a file listed in the manifest is missing, truncated or altered."""
    manifest_path = os.path.join(path, "manifest.json")
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{manifest_path}: unreadable manifest ({e})") from None
    for name, want in files.items():
        p = os.path.join(path, name)
        if not os.path.exists(p):
            raise ValueError(f"{p}: missing checkpoint file")
        if os.path.getsize(p) != want["bytes"] or sha256(p) != want["sha256"]:
            raise ValueError(f"{p}: size or sha256 differs from the manifest (corrupt or truncated)")


def load_weights(model, path, grid=None):
    """Copy a checkpoint's full weights into model, each rank taking its own shard."""
    from safetensors.torch import load_file
    grid = grid or parallel.Grid()
    tensors = load_file(os.path.join(path, "model.safetensors"))
    params = {n: p for n, p in model.named_parameters()}
    missing = sorted(n for n in params if parallel.canonical(n, grid) not in tensors)
    unexpected = sorted(set(tensors) - set(params)) if grid.tp * grid.pp == 1 else []
    for what, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            raise ValueError(f"{path}/model.safetensors: {what} tensors {names[:5]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(parallel.local_slice(n, tensors[parallel.canonical(n, grid)], grid))


def newest_good_checkpoint(ckpt_dir, before=None):
    """The newest checkpoint (at a step <= before) whose files match its manifest; each one
    skipped is reported by name and reason."""
    for path in reversed(step_dirs(ckpt_dir)):
        if before is not None and int(path.rsplit("_", 1)[1]) > before:
            continue
        try:
            verify_checkpoint(path)
            return path
        except ValueError as e:
            print(f"checkpoint {path} is unusable, skipping it: {e}", flush=True)
    return None


def resolve_resume(ckpt_dir, resume):
    """--resume auto | latest | STEP | DIR -> a checkpoint directory, or None for a fresh start.
    auto: the newest good checkpoint, or a fresh start when there is none (safe in a restart
    loop); latest: the newest good one, an error when there is none."""
    if resume is None:
        return None
    if resume in ("auto", "latest"):
        path = newest_good_checkpoint(ckpt_dir)
        if path is None and resume == "latest":
            raise FileNotFoundError(f"--resume latest: no usable checkpoint in {ckpt_dir}")
        return path
    path = os.path.join(ckpt_dir, f"step_{int(resume):07d}") if resume.isdigit() else resume
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume {resume}: {path} does not exist")
    return path


def load_checkpoint(path, device="cpu"):
    """(config, model with the checkpoint's weights) — what eval.py, align.py and infer.py
    start from."""
    verify_checkpoint(path)
    cfg = load_config(os.path.join(path, "config.toml"))
    with torch.device("meta"):  # no memory, no initialisation: the weights come next
        model = Transformer(cfg.model)
    model.to_empty(device=device)
    load_weights(model, path)
    return cfg, model


# ----------------------------------------------------------------------------------------
# Logging, device peaks, and the --estimate calculator

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (no sparsity); first match wins.
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
              ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12), ("L4", 121e12),
              ("4090", 165e12), ("3090", 71e12)]


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_FLOPS if key in name), None)


def fmt_time(s):
    return f"{s / 3600:.1f}h" if s >= 3600 else f"{s / 60:.1f}m" if s >= 60 else f"{s:.0f}s"


class MetricsLog:
    """One line per interval on stdout and the same as JSON lines in metrics.jsonl."""

    def __init__(self, run_dir, enabled, resume_step=None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_step is not None:
            self.rewind(resume_step)

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


def estimate(cfg, gpu="H100", mfu=0.4, usd_per_hour=2.5):
    """Size, compute, memory and cost of a config, printed before anything is spent."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    c, d, p = cfg.model, cfg.data, cfg.parallel
    n_params, n_embed = model.num_params(), model.embed.weight.numel()
    fpt = model.flops_per_token(d.seq_len)
    dp = max(p.dp, 1)
    tokens = cfg.optim.steps * d.seq_len * d.micro_batch * d.grad_accum * dp
    total_flops = fpt * tokens
    peak = next((f for key, f in PEAK_FLOPS if key.lower() in gpu.lower()), 989e12)
    shard = p.tp * p.pp  # weights, grads and moments split across model-parallel ranks
    gib = 2 ** 30
    weights, grads = 4 * n_params / shard, 4 * n_params / shard  # fp32 master weights and grads
    adam = 8 * n_params / shard / (dp if p.zero else 1)
    # Activations kept for backward per layer, bf16: 34*s*b*h bytes (Korthikanti et al. 2022,
    # eq. 1 without the 5*a*s/h attention-matrix term, which flash attention never stores);
    # with per-block recomputation only the block input, 2*s*b*h.
    per_layer = (2 if p.recompute else 34) * d.seq_len * d.micro_batch * c.d_model / p.tp / p.cp
    acts = per_layer * c.n_layers / p.pp + 6 * d.seq_len * d.micro_batch * c.vocab_size / p.tp / p.cp
    gpus = dp * p.tp * p.pp * p.cp
    hours = total_flops / (peak * mfu) / 3600
    rows = [
        ("parameters", f"{n_params / 1e6:,.1f}M ({(n_params - n_embed) / 1e6:,.1f}M without the embedding)"),
        ("FLOPs per token", f"{fpt / 1e9:,.2f} GFLOP (6N + attention, seq_len {d.seq_len})"),
        ("training tokens", f"{tokens / 1e9:,.3f}B ({cfg.optim.steps} steps x {tokens // max(cfg.optim.steps, 1):,})"),
        ("training FLOPs", f"{total_flops:.3e}"),
        ("compute-optimal", f"{20 * n_params / 1e9:,.2f}B tokens for this size, or {tokens / 20 / 1e6:,.1f}M params "
                            "for these tokens (20 tokens/param, Hoffmann et al. 2022)"),
        ("memory per GPU", f"weights {weights / gib:.2f} + grads {grads / gib:.2f} + AdamW {adam / gib:.2f} + "
                           f"activations {acts / gib:.2f} = {(weights + grads + adam + acts) / gib:.2f} GiB"),
        ("GPU-hours", f"{hours:,.1f} on {gpu} at {mfu:.0%} MFU ({peak / 1e12:.0f} TFLOP/s peak); "
                      f"{hours / gpus:,.2f}h wall on {gpus} GPUs"),
        ("cost", f"${hours * usd_per_hour:,.0f} at ${usd_per_hour}/GPU-hour"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


# ----------------------------------------------------------------------------------------
# Surviving faults: background checkpoint writes, preemption signals, loss spikes

EXIT_PREEMPTED = 75  # EX_TEMPFAIL, "try again": a restart loop or Slurm requeue resumes with --resume auto


class Preempted(Exception):
    """Raised at a step boundary after a stop signal, once the checkpoint is on disk."""


class CheckpointWriter:
    """Runs checkpoint writes on a background thread from a CPU snapshot, so training goes
    on while files are written; a new write (or the end of training) first waits for the
    previous one. A failed write is reported, never silently lost; the checkpoints already
    on disk are untouched because a write only becomes visible by its final rename."""

    def __init__(self, asynchronous):
        self.asynchronous, self.thread, self.error = asynchronous, None, None

    def _run(self, write):
        try:
            write()
        except Exception as e:  # reported by wait() to the training loop
            self.error = e

    def submit(self, write):
        self.wait()
        if self.asynchronous:
            self.thread = threading.Thread(target=self._run, args=(write,), name="checkpoint-writer")
            self.thread.start()
        else:
            self._run(write)

    def busy(self):
        return self.thread is not None and self.thread.is_alive()

    def wait(self):
        """Block until the write in flight is done; return its exception, if it failed."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        error, self.error = self.error, None
        return error


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
    t = torch.tensor([float(flag)], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ----------------------------------------------------------------------------------------
# The training loop

def setup_device(cfg, local_rank):
    t = cfg.train
    name = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    kernels.set_backend(t.kernels)
    return device, autocast


def build_model(cfg, grid, device):
    """This rank's part of the model, with the weights the whole model would start from.
    The model is built on the meta device (no memory) and cut to this rank's part; then
    every parameter of the whole model is drawn in turn, whole, from one generator seeded
    with data.seed, and this rank keeps its slice. So every layout starts from the same
    weights as one process, and a rank holds one full tensor at a time, never the whole
    model (an 8B model in fp32 would be 32 GB on every rank)."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    whole = [(name, p.shape) for name, p in model.named_parameters()]  # before parallelize cuts it
    parallel.parallelize(model, grid, cfg.parallel)
    model.to_empty(device=device)
    mine = {parallel.canonical(name, grid): p for name, p in model.named_parameters()}
    generator = torch.Generator(device).manual_seed(cfg.data.seed)
    with torch.no_grad():
        for name, shape in whole:
            full = init_parameter(name, torch.empty(shape, device=device), cfg.model, generator)
            if name in mine:
                mine[name].copy_(parallel.local_slice(name, full, grid))
    return model


def build(cfg, grid, device):
    """The model for this rank's part of the grid, its data parallelism and its optimizer:
    (model, dp, [(name, tensor) the optimizer updates], optimizer)."""
    torch.manual_seed(cfg.data.seed)  # the global generator too: checkpoints save and resume its state
    model = build_model(cfg, grid, device)
    dp = parallel.DataParallel(model, grid, zero=cfg.parallel.zero == 1)
    named = dp.optimizer_params(model)
    if cfg.train.compile:
        model.compile()
    return model, dp, named, build_optimizer(named, cfg.optim, device)


def train(cfg, resume=None):
    rank, world, local_rank = parallel.init_distributed()
    device, autocast = setup_device(cfg, local_rank)
    d, o = cfg.data, cfg.optim
    try:
        grid = parallel.make_grid(cfg.parallel, cfg.model, d)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    master = rank == 0
    run_dir = cfg.log.dir
    ckpt_dir = cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints")
    if master and os.path.isdir(ckpt_dir):
        for leftover in (n for n in os.listdir(ckpt_dir) if n.startswith(".tmp_")):
            shutil.rmtree(os.path.join(ckpt_dir, leftover))  # a write cut short by a crash
    start = resolve_resume(ckpt_dir, resume) if master else None
    if dist.is_initialized():  # rank 0 checked the files; everyone resumes from its choice
        box = [start]
        dist.broadcast_object_list(box, src=0)
        start = box[0]

    model, dp, named, optimizer = build(cfg, grid, device)
    with torch.device("meta"):  # the whole model's size and FLOPs, whatever part this rank holds
        whole = Transformer(cfg.model)
    n_params, flops_per_token = whole.num_params(), whole.flops_per_token(d.seq_len)
    # Ranks of one data-parallel slot (tp, pp and cp peers) read the same sequences.
    loader = data.Loader(d.train, d.seq_len, d.micro_batch, grid.dp_rank, grid.dp, d.seed)
    val_loader = data.Loader(d.val, d.seq_len, d.micro_batch, grid.dp_rank, grid.dp, shuffle=False,
                             key="data.val") if d.val else None
    token_bytes = torch.tensor(data.token_byte_lengths(data.tokenizer_path(d.train)), device=device)
    step, counters = 0, {"tokens": 0, "seconds": 0.0}

    def restore(path):
        nonlocal step, counters
        from safetensors.torch import load_file
        load_weights(model, path, grid)
        parallel.load_optimizer_state(optimizer, named, load_file(os.path.join(path, "optimizer.safetensors")),
                                      grid, device)
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        step, counters = state["step"], state["counters"]
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))

    if start:
        restore(start)
    if master:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.toml"), "w") as f:
            f.write(to_toml(cfg))
        layout = f"dp{grid.dp} tp{grid.tp} pp{grid.pp} cp{grid.cp}" + (" sp" if grid.sequence_parallel else "") \
            + (" zero1" if dp.zero else "")
        print(f"model: {n_params / 1e6:.2f}M parameters, {world} process(es) ({layout}) on {device}"
              + (f", resumed from {start}" if start else ""))
    log = MetricsLog(run_dir, master, step if start else None)
    tokens_per_step = d.seq_len * d.micro_batch * d.grad_accum * grid.dp
    peak = peak_flops(device)
    writer = CheckpointWriter(cfg.checkpoint.asynchronous)
    guard = SpikeGuard(cfg.train)
    stop, restore_signals = catch_stop_signals()
    last_kept = time.time()

    def report_failed_write(block=False):
        error = writer.wait() if block or not writer.busy() else None
        if error:
            log.write({"step": step, "event": "checkpoint_failed", "error": str(error)},
                      f"step {step:>6} | checkpoint write FAILED, earlier checkpoints are intact: {error}")

    def save():
        """Snapshot the consolidated state to CPU memory (the only part training waits
        for when asynchronous) and hand the write to the writer."""
        nonlocal last_kept
        t0 = time.perf_counter()
        report_failed_write(block=True)  # one write in flight at a time
        weights = parallel.full_tensors(dict(model.named_parameters()), grid)
        moments = parallel.full_tensors(parallel.optimizer_state(optimizer, named, dp), grid)
        state = {"step": step, "counters": dict(counters), "loader": loader.state_dict(),
                 "rng": torch.get_rng_state().tolist()}
        keep = cfg.checkpoint
        permanent = bool(keep.keep_every and step % keep.keep_every == 0) or \
            bool(keep.keep_hours and time.time() - last_kept >= keep.keep_hours * 3600)
        last_kept = time.time() if permanent else last_kept
        if master:
            writer.submit(partial(save_checkpoint, ckpt_dir, step, weights, moments, state, cfg, permanent))
        stall = time.perf_counter() - t0
        log.write({"step": step, "event": "checkpoint", "stall_s": stall, "asynchronous": writer.asynchronous},
                  f"step {step:>6} | checkpoint {'queued' if writer.asynchronous else 'written'}, "
                  f"training stalled {stall:.2f}s")

    def validate():
        if not val_loader:
            return
        val_loader.load_state_dict({**val_loader.state_dict(), "epoch": 0, "pos": 0})  # the same windows each time
        loss, bpb = evaluation.loss_and_bpb(
            lambda x, y: parallel.forward_backward(model, grid, dp, [(x, y)], cfg.parallel, autocast, backward=False),
            val_loader, cfg.eval.val_batches, token_bytes, grid.groups.get("dp"))
        log.write({"step": step, "val_loss": loss, "val_bpb": bpb},
                  f"step {step:>6} | val loss {loss:.4f} | val bpb {bpb:.4f}")

    def roll_back(bad_batches):
        writer.wait()
        path = newest_good_checkpoint(ckpt_dir, before=step) if master else None
        if dist.is_initialized():
            box = [path]
            dist.broadcast_object_list(box, src=0)
            path = box[0]
        if path is None:
            log.write({"step": step, "event": "rollback_impossible"},
                      f"step {step:>6} | {guard.in_a_row} bad steps in a row, no checkpoint to roll back to")
            return
        skip = loader.skip | set(bad_batches)
        from_step = step
        restore(path)
        loader.skip |= skip  # replay from the checkpoint without the batches that caused the spikes
        log.rewind(step)
        log.write({"step": step, "event": "rollback", "from_step": from_step, "skipped_batches": sorted(skip)},
                  f"step {step:>6} | rolled back from step {from_step} to {path}, "
                  f"skipping {len(skip)} batch(es) from now on")

    try:
        bad_batches = []
        while step < o.steps:
            if world_max("signal" in stop, device) if world > 1 else "signal" in stop:
                save()
                error = writer.wait()
                log.write({"step": step, "event": "preempted", "signal": stop.get("signal", "peer"),
                           "checkpoint_error": str(error) if error else None},
                          f"step {step:>6} | {stop.get('signal', 'a peer rank was signalled')}: checkpointed, "
                          f"exiting with code {EXIT_PREEMPTED}")
                raise Preempted(stop.get("signal", "peer"))
            t0 = time.perf_counter()
            lr = lr_at(step, o)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches, batch_ids = [], []
            for _ in range(d.grad_accum):
                batches.append(tuple(t.to(device, non_blocking=True) for t in loader.next_batch()))
                batch_ids.append(loader.last_batch)
            loss = parallel.forward_backward(model, grid, dp, batches, cfg.parallel, autocast)
            grad_norm = parallel.clip_grad_norm(named, o.clip, grid, dp.zero)
            loss, grad_norm = loss.item(), float(grad_norm)  # the one host sync per step
            verdict = guard.verdict(loss, grad_norm)
            if verdict is None:
                optimizer.step()
                dp.after_step()
                guard.accept(loss)
                bad_batches = []
            dp.zero_grad(model)
            step += 1
            dt = time.perf_counter() - t0
            counters["tokens"] += tokens_per_step
            counters["seconds"] += dt
            if verdict:
                bad_batches += batch_ids
                log.write({"step": step, "event": f"skip_{verdict}", "loss": loss, "grad_norm": grad_norm,
                           "batches": batch_ids},
                          f"step {step:>6} | skipped the update: {verdict} loss {loss:.4f}, grad {grad_norm:.3f}, "
                          f"batches {batch_ids}")
                if guard.reject():
                    roll_back(bad_batches)
                    guard.in_a_row, bad_batches = 0, []
                continue
            if step % cfg.log.every == 0 or step == o.steps:
                rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": tokens_per_step / dt, "tokens": counters["tokens"],
                       "elapsed_s": counters["seconds"]}
                mfu = f" | mfu {flops_per_token * tokens_per_step / dt / (peak * world):.1%}" if peak else ""
                eta = fmt_time(counters["seconds"] / step * (o.steps - step))
                log.write(rec, f"step {step:>6}/{o.steps} | loss {loss:.4f} | lr {lr:.2e} | grad {grad_norm:.3f} "
                               f"| {rec['tokens_per_s'] / 1e3:.1f}k tok/s{mfu} | eta {eta}")
            if cfg.eval.val_every and step % cfg.eval.val_every == 0 and step < o.steps:
                validate()
            if cfg.eval.every and step % cfg.eval.every == 0:  # benchmarks (eval.py) on a whole copy, on rank 0
                weights = parallel.full_tensors(dict(model.named_parameters()), grid)
                if master:
                    log.write(*evaluation.monitor(cfg.eval, data.tokenizer_path(d.train), cfg.model, weights, step,
                                                  device, autocast))
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < o.steps:
                save()
            report_failed_write()
        validate()
        save()
        error = writer.wait()
        if error:
            raise RuntimeError(f"the final checkpoint could not be written: {error}") from error
    finally:
        restore_signals()
        writer.wait()
    if master:
        write_report(cfg, n_params)
    if dist.is_initialized():
        dist.barrier()
    return model


def write_report(cfg, n_params):
    """report.md in the run directory: a one-page card of the run. Later stages (eval,
    alignment, inference) append their own sections."""
    with open(os.path.join(cfg.log.dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train_recs = [r for r in records if "loss" in r]
    val_recs = [r for r in records if "val_loss" in r]
    stats_path = os.path.join(os.path.dirname(data.find_shards(cfg.data.train)[0]), "stats.json")
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
    if val_recs:
        lines.append(f"- validation: loss {val_recs[-1]['val_loss']:.3f}, "
                     f"{val_recs[-1]['val_bpb']:.3f} bits per byte")
    with open(os.path.join(cfg.log.dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--resume", nargs="?", const="latest",
                   help="auto (newest good checkpoint, or a fresh start: safe in a restart loop), latest (default; "
                        "an error if there is none), a step number, or a directory")
    p.add_argument("--estimate", action="store_true", help="print size, FLOPs, memory and cost, then exit")
    p.add_argument("--gpu", default="H100")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--usd-per-hour", type=float, default=2.5)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.estimate:
            return estimate(cfg, args.gpu, args.mfu, args.usd_per_hour)
        check_data_paths(cfg)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, a bad shard or task file
        sys.exit(f"error: {e}")
    try:
        train(cfg, args.resume)
    except Preempted:
        sys.exit(EXIT_PREEMPTED)
    finally:
        if dist.is_initialized():
            gc.collect()  # free the model's cycles (hooks, partials) that hold gloo/NCCL groups first
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
