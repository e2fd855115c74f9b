"""train.py — pretraining: config, optimizer, schedule, the loop, checkpoints, logging.

    python train.py --config configs/tiny.toml [--set optim.lr=1e-3 ...] [--resume latest|STEP|DIR]
    torchrun --nproc-per-node 8 train.py --config configs/x.toml
    python train.py --config configs/x.toml --estimate [--gpu H100 --mfu 0.4 --usd-per-hour 2.5]
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import data
import eval as evaluation
import kernels
import parallel
from model import ModelConfig, Transformer


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


@dataclass
class LogConfig:
    dir: str = "runs/default"   # the run directory: config, metrics.jsonl, report.md
    every: int = 10


@dataclass
class EvalConfig:
    every: int = 0              # benchmark tasks (eval.py) every N steps; 0: never
    tasks: str = ""
    val_every: int = 100        # validation loss every N steps (and at the end); 0: only at the end
    val_batches: int = 10


@dataclass
class TrainConfig:
    device: str = "auto"        # auto: cuda when available, else cpu
    dtype: str = choice("auto", "float32", "bfloat16")  # auto: bf16 autocast on cuda, fp32 on cpu
    kernels: str = choice("auto", "torch", "triton")
    compile: bool = False


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
    return Config(**built)


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
    """Fail before any training if a shard pattern matches nothing."""
    data.find_shards(cfg.data.train, "data.train")
    if cfg.data.val:
        data.find_shards(cfg.data.val, "data.val")


# ----------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule

def build_optimizer(model, o: OptimConfig, device):
    """AdamW; weight decay only on matrices of the blocks and the head. Norm gains and
    embeddings are not decayed: shrinking them toward 0 is not a useful prior (GPT-3,
    nanoGPT); a tied head is the embedding and follows it."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def step_dirs(ckpt_dir):
    """Finished checkpoints, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(os.path.join(ckpt_dir, d) for d in os.listdir(ckpt_dir) if d.startswith("step_"))


def save_checkpoint(ckpt_dir, step, model, optimizer, state, cfg):
    from safetensors.torch import save_file
    final = os.path.join(ckpt_dir, f"step_{step:07d}")
    tmp = os.path.join(ckpt_dir, f".tmp_step_{step:07d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    names = {p: n for n, p in model.named_parameters()}
    save_file({n: p.detach().float().cpu().contiguous() for p, n in names.items()},
              os.path.join(tmp, "model.safetensors"))
    moments = {f"{names[p]}.{k}": v.detach().cpu().contiguous()
               for p, s in optimizer.state.items() for k, v in s.items() if torch.is_tensor(v)}
    save_file(moments, os.path.join(tmp, "optimizer.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f)
    with open(os.path.join(tmp, "config.toml"), "w") as f:
        f.write(to_toml(cfg))
    tokenizer = data.tokenizer_path(cfg.data.train)
    shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.json"))  # the checkpoint serves on its own
    files = {n: {"bytes": os.path.getsize(os.path.join(tmp, n)), "sha256": sha256(os.path.join(tmp, n))}
             for n in sorted(os.listdir(tmp))}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in step_dirs(ckpt_dir)[:-cfg.checkpoint.keep or None]:
        shutil.rmtree(old)
    return final


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


def load_weights(model, path):
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(path, "model.safetensors"))
    params = dict(model.named_parameters())
    for what, names in (("missing", set(params) - set(tensors)), ("unexpected", set(tensors) - set(params))):
        if names:
            raise ValueError(f"{path}/model.safetensors: {what} tensors {sorted(names)[:5]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])


def load_optimizer(optimizer, model, path):
    from safetensors.torch import load_file
    moments = load_file(os.path.join(path, "optimizer.safetensors"))
    for name, p in model.named_parameters():
        keys = [k for k in moments if k.rsplit(".", 1)[0] == name]
        if keys:
            optimizer.state[p] = {k.rsplit(".", 1)[1]: moments[k].to(p.device) for k in keys}
            optimizer.state[p]["step"] = optimizer.state[p]["step"].cpu()  # AdamW keeps step on the CPU


def resolve_resume(ckpt_dir, resume):
    """--resume latest | STEP | DIR -> a checkpoint directory (or None for a fresh start)."""
    if resume is None:
        return None
    if resume == "latest":
        found = step_dirs(ckpt_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {ckpt_dir}")
        return found[-1]
    path = os.path.join(ckpt_dir, f"step_{int(resume):07d}") if resume.isdigit() else resume
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume {resume}: {path} does not exist")
    return path


def load_checkpoint(path, device="cpu"):
    """(config, model with the checkpoint's weights) — what eval.py, align.py and infer.py
    start from."""
    verify_checkpoint(path)
    cfg = load_config(os.path.join(path, "config.toml"))
    model = Transformer(cfg.model)
    load_weights(model, path)
    return cfg, model.to(device)


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
        if enabled and resume_step is not None and os.path.exists(self.path):
            # Lines past the checkpoint came from the interrupted run: the resumed run redoes them.
            with open(self.path) as f:
                keep = [line for line in f if json.loads(line)["step"] <= resume_step]
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
# The training loop

def setup_device(cfg, local_rank):
    t = cfg.train
    name = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    kernels.set_backend(t.kernels)
    return device, autocast


def train(cfg, resume=None):
    rank, world, local_rank = parallel.init_distributed()
    device, autocast = setup_device(cfg, local_rank)
    d, o = cfg.data, cfg.optim
    if cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp != 1:
        raise ConfigError("parallel.tp, pp and cp > 1 arrive with the parallelism of parallel.py")
    master = rank == 0
    run_dir = cfg.log.dir
    ckpt_dir = cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints")
    start = resolve_resume(ckpt_dir, resume)

    torch.manual_seed(d.seed)  # the same initial weights on every rank
    model = Transformer(cfg.model).to(device)
    optimizer = build_optimizer(model, o, device)
    loader = data.Loader(d.train, d.seq_len, d.micro_batch, rank, world, d.seed)
    val_loader = data.Loader(d.val, d.seq_len, d.micro_batch, rank, world, shuffle=False, key="data.val") \
        if d.val else None
    token_bytes = torch.tensor(data.token_byte_lengths(data.tokenizer_path(d.train)), device=device)
    step, counters = 0, {"tokens": 0, "seconds": 0.0}
    if start:
        verify_checkpoint(start)
        load_weights(model, start)
        load_optimizer(optimizer, model, start)
        with open(os.path.join(start, "state.json")) as f:
            state = json.load(f)
        step, counters = state["step"], state["counters"]
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
    if master:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.toml"), "w") as f:
            f.write(to_toml(cfg))
        print(f"model: {model.num_params() / 1e6:.2f}M parameters, {world} process(es) on {device}"
              + (f", resumed from {start}" if start else ""))
    log = MetricsLog(run_dir, master, step if start else None)
    fwd_model = torch.compile(model) if cfg.train.compile else model
    tokens_per_step = d.seq_len * d.micro_batch * d.grad_accum * world
    flops_per_step = model.flops_per_token(d.seq_len) * tokens_per_step
    peak = peak_flops(device)

    def save():
        state = {"step": step, "counters": counters, "loader": loader.state_dict(),
                 "rng": torch.get_rng_state().tolist()}
        if master:
            save_checkpoint(ckpt_dir, step, model, optimizer, state, cfg)

    def validate():
        if not val_loader:
            return
        val_loader.load_state_dict({**val_loader.state_dict(), "epoch": 0, "pos": 0})
        loss, bpb = evaluation.loss_and_bpb(fwd_model, val_loader, cfg.eval.val_batches, token_bytes, autocast)
        log.write({"step": step, "val_loss": loss, "val_bpb": bpb},
                  f"step {step:>6} | val loss {loss:.4f} | val bpb {bpb:.4f}")

    while step < o.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, o)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for _ in range(d.grad_accum):
            x, y = (t.to(device, non_blocking=True) for t in loader.next_batch())
            with autocast:
                loss = fwd_model(x, y)
            (loss / d.grad_accum).backward()
            loss_sum += loss.detach()
        parallel.all_reduce_grads(model.parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss = loss_sum / d.grad_accum
        if world > 1:
            dist.all_reduce(loss)  # gloo has no AVG
            loss /= world
        loss = loss.item()  # the one host sync per step
        dt = time.perf_counter() - t0
        counters["tokens"] += tokens_per_step
        counters["seconds"] += dt
        if step % cfg.log.every == 0 or step == o.steps:
            rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                   "tokens_per_s": tokens_per_step / dt, "tokens": counters["tokens"], "elapsed_s": counters["seconds"]}
            mfu = f" | mfu {flops_per_step / dt / (peak * world):.1%}" if peak else ""
            eta = fmt_time(counters["seconds"] / step * (o.steps - step)) if step else "?"
            log.write(rec, f"step {step:>6}/{o.steps} | loss {loss:.4f} | lr {lr:.2e} | grad {float(grad_norm):.3f} "
                           f"| {rec['tokens_per_s'] / 1e3:.1f}k tok/s{mfu} | eta {eta}")
        if cfg.eval.val_every and step % cfg.eval.val_every == 0 and step < o.steps:
            validate()
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < o.steps:
            save()
    validate()
    save()
    if master:
        write_report(cfg, model)
    if dist.is_initialized():
        dist.barrier()
    return model


def write_report(cfg, model):
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
              f"- model: {model.num_params() / 1e6:.2f}M parameters, {cfg.model.n_layers} layers, "
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
    p.add_argument("--resume", nargs="?", const="latest", help="latest (default), a step number, or a directory")
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
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    train(cfg, args.resume)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
