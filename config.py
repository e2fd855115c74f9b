"""config.py — the run config: TOML sections -> nested dataclasses, checked key by key.

    cfg = load_config("configs/tiny.toml", ["optim.lr=1e-3"])   # --config FILE --set section.key=value

Every key, its default and what it does is a field below (`ModelConfig` lives in model.py).
An unknown key, a wrong type, a value outside a key's choices or range is a ConfigError
naming the key and what is valid. The resolved config (`to_toml`) is saved with every run.
"""
import argparse
import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field

from model import ModelConfig


def choice(default, *choices):
    return field(default=default, metadata={"choices": (default, *choices)})


def at_least(default, low):
    return field(default=default, metadata={"min": low})


def shards(default=""):
    """A glob of token shards, or a table of named sources {name = {path = GLOB, weight = W}}."""
    return field(default=default, metadata={"sources": True})


@dataclass
class DataConfig:
    train: str = shards()       # e.g. "runs/demo/tokens/train_*.bin", or { code = { path = "...", weight = 0.3 }, ... }
    val: str = shards()         # the same; a table validates each source on its own
    seq_len: int = at_least(256, 1)
    micro_batch: int = at_least(8, 1)   # sequences per rank per micro-step
    grad_accum: int = at_least(1, 1)    # micro-steps per optimizer step
    seed: int = 1337            # data order and weight initialisation
    doc_mask: bool = False      # attention stops at each <|bos|> and positions restart there (packed documents)


@dataclass
class OptimConfig:
    name: str = choice("adamw", "muon")  # muon: Muon on the hidden matrices, AdamW on the rest (train.Muon)
    muon_lr: float = at_least(0.02, 0.0)  # Muon's peak rate; it follows the schedule's shape
    muon_momentum: float = at_least(0.95, 0.0)
    lr: float = at_least(3e-4, 0.0)
    min_lr: float = at_least(3e-5, 0.0)
    weight_decay: float = at_least(0.1, 0.0)
    beta1: float = at_least(0.9, 0.0)
    beta2: float = at_least(0.95, 0.0)
    eps: float = at_least(1e-8, 0.0)
    clip: float = at_least(1.0, 0.0)    # max global gradient norm; 0 disables clipping
    warmup: int = at_least(100, 0)
    steps: int = at_least(1000, 1)
    schedule: str = choice("cosine", "wsd")
    decay_frac: float = at_least(0.2, 0.0)  # wsd: fraction of steps spent decaying to min_lr


@dataclass
class ParallelConfig:
    dp: int = at_least(0, 0)    # 0: the world size divided by tp * pp * cp
    tp: int = at_least(1, 1)
    pp: int = at_least(1, 1)
    cp: int = at_least(1, 1)
    ep: int = at_least(1, 1)
    zero: int = choice(0, 1, 2, 3)  # ZeRO stage over data-parallel ranks: 1 AdamW state, 2 + gradients, 3 + parameters
    sequence_parallel: bool = False
    pp_schedule: str = choice("1f1b", "afab")
    microbatches: int = at_least(0, 0)  # pipeline micro-batches per micro-step; 0: one per sequence
    recompute: bool = False


@dataclass
class CheckpointConfig:
    dir: str = ""               # "" : <log.dir>/checkpoints
    every: int = at_least(0, 0)  # steps between checkpoints; 0: only at the end
    keep: int = at_least(3, 1)  # most recent checkpoints kept
    keep_every: int = at_least(0, 0)  # also keep every checkpoint at a multiple of this many steps, forever
    keep_hours: float = at_least(0.0, 0.0)  # also keep one checkpoint per this many hours of training, forever
    asynchronous: bool = True   # write from a CPU snapshot on a background thread while training goes on


@dataclass
class LogConfig:
    dir: str = "runs/default"   # the run directory: config, metrics.jsonl, report.md
    every: int = at_least(10, 1)
    backends: str = ""          # tracking besides metrics.jsonl, any of "tensorboard,wandb,mlflow" (when installed)


@dataclass
class EvalConfig:
    every: int = at_least(0, 0)  # benchmark tasks (eval.py) every N steps; 0: never
    tasks: str = ""             # "hellaswag=path.jsonl,arc_easy=path.jsonl" (eval.py --tasks)
    limit: int = at_least(200, 0)  # a fixed random subset of N examples per task; 0: all
    mode: str = choice("norm", "pmi", "letter")  # cloze (norm), cloze + PMI, or A/B/C/D letters
    shots: int = at_least(0, 0)
    val_every: int = at_least(100, 0)  # validation loss every N steps (and at the end); 0: only at the end
    val_batches: int = at_least(10, 1)


@dataclass
class TrainConfig:
    init_from: str = ""         # weights to start from: a checkpoint or a Hugging Face directory (not its optimizer)
    device: str = "auto"        # auto: cuda when available, else cpu
    dtype: str = choice("auto", "float32", "bfloat16")  # auto: bf16 autocast on cuda, fp32 on cpu
    kernels: str = choice("auto", "torch", "triton")
    compile: bool = False
    skip_nonfinite: bool = True  # a NaN/inf loss or gradient norm skips the update instead of applying it
    spike_factor: float = at_least(0.0, 0.0)  # a loss above this x its running mean skips the update; 0: off
    spike_window: int = at_least(20, 1)  # steps of running mean (and of warm-up before spikes are judged)
    max_spikes: int = at_least(3, 1)  # consecutive skipped steps that roll back to the last checkpoint


@dataclass
class AlignConfig:
    """align.py's post-training; [data] seq_len, micro_batch (examples per rank per micro-step),
    grad_accum and seed, [optim] and [checkpoint] mean what they mean for pretraining."""
    method: str = choice("sft", "rm", "dpo", "rloo", "grpo", "ppo")
    train: str = ""             # jsonl (or a .json list): conversations (sft), preference pairs (rm, dpo), prompts
    val: str = ""               # held-out examples of the same kind: loss, and accuracy for rm and dpo
    pack: bool = True           # sft: several conversations per sequence, attention stopping at each
    loss: str = choice("sigmoid", "ipo", "hinge")  # dpo's loss (DPO, IPO, SLiC's hinge)
    beta: float = at_least(0.1, 0.0)  # dpo: the implicit KL strength; rloo, grpo, ppo: the KL penalty
    label_smoothing: float = at_least(0.0, 0.0)  # dpo: the share of flipped labels assumed (cDPO)
    reference: str = choice("precomputed", "live")  # dpo: reference log-probs once up front, or every step
    reward: str = ""            # rl: a reward model checkpoint directory, or module:function(completion, example)
    samples: int = at_least(4, 1)  # rl: completions per prompt (the group of rloo and grpo)
    max_new_tokens: int = at_least(64, 1)
    temperature: float = at_least(1.0, 0.0)
    ppo_epochs: int = at_least(1, 1)  # rl: passes over each batch of rollouts
    clip: float = at_least(0.2, 0.0)  # grpo, ppo: the policy ratio's clip range (and ppo's value clip)
    gamma: float = at_least(1.0, 0.0)  # ppo: discount
    lam: float = at_least(0.95, 0.0)  # ppo: GAE's lambda
    vf_coef: float = at_least(0.1, 0.0)  # ppo: the value loss's weight


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
    align: AlignConfig = field(default_factory=AlignConfig)


class ConfigError(ValueError):
    pass


def check_value(key, f, value):
    """The value for dataclass field f, or a ConfigError naming key."""
    if f.metadata.get("sources") and isinstance(value, dict):
        return {name: check_source(f"{key}.{name}", s) for name, s in value.items()}
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str)}[f.type]
    if not ok(value):
        raise ConfigError(f"{key} = {value!r}: expected {f.type.__name__}, got {type(value).__name__}")
    if f.type is float and not math.isfinite(value):
        raise ConfigError(f"{key} = {value!r}: expected a finite number")
    choices, low = f.metadata.get("choices"), f.metadata.get("min")
    if choices and value not in choices:
        raise ConfigError(f"{key} = {value!r}: choose one of {', '.join(map(repr, choices))}")
    if low is not None and value < low:
        raise ConfigError(f"{key} = {value!r}: must be at least {low}")
    return float(value) if f.type is float else value


def check_source(key, source):
    """One source of a data mixture: {path = GLOB, weight = W > 0}."""
    if not isinstance(source, dict) or set(source) - {"path", "weight"} or not isinstance(source.get("path"), str):
        raise ConfigError(f"{key} = {source!r}: expected {{ path = \"GLOB\", weight = W }}")
    weight = source.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
        raise ConfigError(f"{key}.weight = {weight!r}: a source's weight must be a positive number")
    return {"path": source["path"], "weight": float(weight)}


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
            kwargs[key] = check_value(f"{where}: {name}.{key}", fields[key], value)
        try:
            built[name] = cls(**kwargs)
        except ValueError as e:  # ModelConfig's own checks
            raise ConfigError(f"{where}: {e}") from None
    cfg = Config(**built)
    if "M" in cfg.model.block_pattern and cfg.data.doc_mask:
        raise ConfigError(f"{where}: data.doc_mask with Mamba layers (model.block_pattern): the scan carries its "
                          "state across documents; use data.doc_mask = false")
    if unknown := {b.strip() for b in cfg.log.backends.split(",") if b.strip()} - {"tensorboard", "wandb", "mlflow"}:
        raise ConfigError(f"{where}: log.backends: unknown {sorted(unknown)}; choose from tensorboard, wandb, mlflow")
    if cfg.optim.name == "muon" and (cfg.parallel.tp > 1 or cfg.parallel.zero):
        raise ConfigError(f"{where}: optim.name = \"muon\" with parallel.tp or zero: Muon orthogonalises whole "
                          "matrices, and tp and ZeRO give a rank slices of them; use dp or pp")
    if cfg.data.seq_len > cfg.model.max_seq_len:  # the RoPE tables hold max_seq_len positions
        raise ConfigError(f"{where}: data.seq_len = {cfg.data.seq_len} is longer than model.max_seq_len = "
                          f"{cfg.model.max_seq_len}")
    return cfg


def number(kind, low):
    """An argparse type for a command-line number: kind (int or float) and at least low, so
    -1 or nan is refused with one line naming the flag."""
    def parse(text):
        value = kind(text)
        if not value >= low:  # NaN fails too
            raise argparse.ArgumentTypeError(f"{text}: must be at least {low}")
        return value
    return parse


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
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    for assignment in overrides:
        apply_override(d, assignment)
    return config_from_dict(d, where=path)


def to_toml(cfg):
    """The resolved config as TOML text (saved in every run directory and checkpoint)."""
    def value(v):
        if isinstance(v, dict):  # an inline table
            keys = [k if k.isidentifier() else json.dumps(k) for k in v]
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in zip(keys, v.values())) + " }"
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()
    def section(name):
        return f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in dataclasses.asdict(getattr(cfg, name)).items())
    return "\n".join(section(s.name) for s in dataclasses.fields(cfg))
