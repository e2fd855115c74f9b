"""checkpoint.py — weights and training state on disk, and the one way from weights to a model.

    cfg, model = checkpoint.load_model("runs/demo/checkpoints/step_0000600")   # eval, infer, your scripts
    model = checkpoint.load_hf("hf/")   # a transformers Llama/Qwen3 directory in; save_hf(model, dir) out

A checkpoint is step_NNNNNNN/ with model.safetensors (fp32, model.py's names), optimizer.safetensors
(NAME.exp_avg, NAME.exp_avg_sq, NAME.step), state.json, config.toml, tokenizer.json and manifest.json
(bytes and sha256 of each), written under a temporary name and renamed once complete.
Every model, fresh, resumed, evaluated, served or imported, is built by `build_model`: on the
meta device, cut to this rank's part of the layout, then each parameter filled with its piece
of a whole tensor, read from a file (memory-mapped, only the piece) or drawn by the initialiser.
"""
import json
import os
import re
import shutil
import threading
import zlib
from functools import partial

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import data
import parallel
from config import Config, load_config, to_toml
from model import ModelConfig, Transformer, init_parameter
from prep.tokenizer import file_sha256


class CheckpointError(ValueError):
    pass


# ----------------------------------------------------------------------------------------
# The one way from weights to a model. A source maps each whole tensor's name to (its
# shape, read(spec) -> this rank's piece of it), parallel.shard_spec saying which piece.

def build_model(cfg: Config, device="cpu", weights=None, grid=None, where="weights"):
    """This rank's part of the model (all of it on one process) with weights from `weights`:
    None (drawn by the initialiser from data.seed), a checkpoint directory, or a source (its
    name in errors: where). A rank holds one whole tensor at a time, never the whole model
    (an 8B model in fp32 would be 32 GB on every rank)."""
    grid = grid or parallel.Grid()
    with torch.device("meta"):
        model = Transformer(cfg.model)
    parallel.parallelize(model, grid, cfg.parallel)
    model.to_empty(device=device)
    if weights is None:
        weights, where = init_source(cfg.model, cfg.data.seed, device), "init"
    elif isinstance(weights, str):
        weights, where = file_source([os.path.join(weights, "model.safetensors")]), weights
    fill(model, weights, grid, where)
    return model


def fill(model, source, grid, where):
    """Copy into each parameter of model (this rank's part) its piece of the source's tensor
    of that name, after checking the source against the whole model's names and shapes."""
    with torch.device("meta"):
        whole = {n: tuple(p.shape) for n, p in Transformer(model.cfg).named_parameters()}
    for what, names in (("missing", whole.keys() - source.keys()), ("unexpected", source.keys() - whole.keys())):
        if names:
            raise CheckpointError(f"{where}: {what} tensors {sorted(names)[:5]}")
    wrong = [f"{n} is {source[n][0]}, the model's is {s}" for n, s in whole.items() if tuple(source[n][0]) != s]
    if wrong:
        raise CheckpointError(f"{where}: shapes differ from the model's config: " + "; ".join(wrong[:3]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            name = parallel.canonical(name, grid)
            p.copy_(source[name][1](parallel.shard_spec(name, grid)))


def init_source(model_cfg: ModelConfig, seed, device):
    """Each tensor drawn whole by model.init_parameter from a generator of its own, seeded with
    the seed and its name: the weights do not depend on the layout or on which rank draws."""
    def draw(name, shape, spec):
        generator = torch.Generator(device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        return parallel.piece(init_parameter(name, torch.empty(shape, device=device), model_cfg, generator), spec)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Transformer(model_cfg).named_parameters()}
    return {n: (s, partial(draw, n, s)) for n, s in shapes.items()}


def tensor_source(tensors):
    """A source over whole tensors in memory."""
    return {n: (tuple(t.shape), partial(parallel.piece, t)) for n, t in tensors.items()}


def file_source(paths, rename=lambda key: key):
    """A source over the tensors of safetensors files, each read piece by piece (the files
    are memory-mapped: a rank reads only what it holds). rename maps a key on disk to
    model.py's name, or None to skip it."""
    source = {}
    for path in paths:
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: missing weights file")
        with safe_open(path, "pt") as f:
            for key in f.keys():
                if (name := rename(key)) is not None:
                    source[name] = (tuple(f.get_slice(key).get_shape()), partial(read_piece, path, key))
    return source


def read_piece(path, key, spec):
    with safe_open(path, "pt") as f:
        if spec is None or not f.get_slice(key).get_shape():
            return f.get_tensor(key)
        dim, index, count = spec
        part = f.get_slice(key)
        n = part.get_shape()[dim] // count
        return part[(slice(None),) * dim + (slice(index * n, (index + 1) * n),)]


def load_model(path, device="cpu"):
    """(config, model) from a checkpoint directory, checked against its manifest first."""
    verify_checkpoint(path)
    cfg = load_config(os.path.join(path, "config.toml"))
    return cfg, build_model(cfg, device, weights=path)


def load_optimizer_state(optimizer, named, path, grid):
    """Put a checkpoint's AdamW state back into the optimizer: each tensor sliced to this
    rank's tp shard and, under ZeRO-1, to the piece of the flat parameter it updates. `step`
    goes where torch's own load_state_dict puts it: on the parameter's device for fused or
    capturable AdamW (their kernels reject a CPU step on CUDA), on the CPU otherwise."""
    file = os.path.join(path, "optimizer.safetensors")
    with safe_open(file, "pt") as f:
        keys = set(f.keys())
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for name, t in named:
        whole = parallel.canonical(name, grid)
        if f"{whole}.exp_avg" not in keys:
            continue
        state = {}
        for key in ("exp_avg", "exp_avg_sq", "step"):
            value = read_piece(file, f"{whole}.{key}", parallel.shard_spec(whole, grid))
            if key != "step" and hasattr(t, "zero_slot"):
                start = t.zero_slot[2]
                value = value.flatten()[start:start + t.numel()]
            state[key] = value.to(t.device) if key != "step" or on_device else value.float().cpu()
        optimizer.state[t] = state


# ----------------------------------------------------------------------------------------
# Writing, retention, integrity

def step_dirs(ckpt_dir):
    """Finished checkpoints, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(os.path.join(ckpt_dir, d) for d in os.listdir(ckpt_dir) if d.startswith("step_"))


def save_checkpoint(ckpt_dir, step, weights, moments, state, cfg, permanent=False):
    """Write full (consolidated) tensors and state as step_NNNNNNN, atomically: files go to
    a temporary directory that is renamed only once the manifest is written. Then drop old
    checkpoints beyond the newest checkpoint.keep, except permanent ones."""
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
    shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.json"))
    files = {n: {"bytes": os.path.getsize(os.path.join(tmp, n)), "sha256": file_sha256(os.path.join(tmp, n))}
             for n in sorted(os.listdir(tmp))}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump({"step": step, "keep": permanent, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    old = step_dirs(ckpt_dir)
    for path in old[:max(0, len(old) - cfg.checkpoint.keep)]:
        if not read_manifest(path).get("keep"):
            shutil.rmtree(path)
    return final


def read_manifest(path):
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def verify_checkpoint(path):
    """Raise CheckpointError if path is no finished checkpoint, or a file listed in its
    manifest is missing, truncated or altered."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.exists(manifest_path):
        raise CheckpointError(f"{path}: no manifest.json (not a checkpoint, or one whose writing never finished)")
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None
    for name, want in files.items():
        p = os.path.join(path, name)
        if not os.path.exists(p):
            raise CheckpointError(f"{p}: missing checkpoint file")
        if os.path.getsize(p) != want["bytes"] or file_sha256(p) != want["sha256"]:
            raise CheckpointError(f"{p}: size or sha256 differs from the manifest (corrupt or truncated)")


def newest_good_checkpoint(ckpt_dir, before=None):
    """The newest checkpoint (at a step <= before) whose files match its manifest; each one
    skipped is reported by name and reason."""
    for path in reversed(step_dirs(ckpt_dir)):
        if before is not None and int(path.rsplit("_", 1)[1]) > before:
            continue
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            print(f"checkpoint {path} is unusable, skipping it: {e}", flush=True)
    return None


def resolve_resume(ckpt_dir, resume):
    """--resume auto | latest | STEP | DIR -> a verified checkpoint directory, or None for a
    fresh start. auto: the newest good checkpoint, or a fresh start when there is none (safe
    in a restart loop); latest: the newest good one, an error when there is none."""
    if resume is None:
        return None
    if resume in ("auto", "latest"):
        path = newest_good_checkpoint(ckpt_dir)
        if path is None and resume == "latest":
            raise CheckpointError(f"--resume latest: no usable checkpoint in {ckpt_dir}")
        return path
    path = os.path.join(ckpt_dir, f"step_{int(resume):07d}") if resume.isdigit() else resume
    verify_checkpoint(path)
    return path


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


# ----------------------------------------------------------------------------------------
# Hugging Face format: config.json + model.safetensors with transformers' key names.
# Our names differ from transformers' only by these patterns ({i} is a layer index).

HF_NAMES = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.attn.{w}.weight", "model.layers.{i}.self_attn.{w}.weight"),
    ("layers.{i}.mlp.{w}.weight", "model.layers.{i}.mlp.{w}.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


def hf_rename(name, reverse=False):
    """Our name -> transformers' (or back with reverse); a KeyError for a name with no counterpart."""
    for ours, theirs in HF_NAMES:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        pattern = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{w\}", r"(?P<w>\w+)")
        m = re.fullmatch(pattern, name)
        if m:
            return dst.format(**m.groupdict())
    raise KeyError(name)


def save_hf(model, out_dir, dtype=torch.float32):
    """Write config.json and model.safetensors that transformers' LlamaForCausalLM (or
    Qwen3ForCausalLM when the model uses QK-norm) loads with equal logits."""
    c = model.cfg
    arch, model_type = ("Qwen3ForCausalLM", "qwen3") if c.qk_norm else ("LlamaForCausalLM", "llama")
    config = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
        # transformers < 5 reads rope_theta, >= 5 reads rope_parameters: write both.
        "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "initializer_range": c.init_std, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    # A tied head is the embedding: store it once, as transformers does.
    tensors = {hf_rename(n): p.detach().to(dtype).contiguous().cpu() for n, p in model.named_parameters()}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def config_from_hf(hf, where="config.json"):
    """ModelConfig from a transformers config.json dict (Llama or Qwen3)."""
    if hf.get("model_type") not in ("llama", "qwen3"):
        raise CheckpointError(f"{where}: model_type {hf.get('model_type')!r} is not supported (llama, qwen3)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{where}: RoPE scaling {rope.get('rope_type')!r} is not supported")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(f"{where}: only silu activations without biases are supported")
    n_heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
        qk_norm=hf["model_type"] == "qwen3", init_std=hf.get("initializer_range", 0.02))


def hf_source(hf_dir, cfg):
    """A source over a transformers checkpoint, one file or sharded (model.safetensors.index.json)."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")

    def rename(key):
        if "rotary_emb" in key or (cfg.tie_embeddings and key == "lm_head.weight"):
            return None  # RoPE's inv_freq is computed; some exports store a tied head twice
        try:
            return hf_rename(key, reverse=True)
        except KeyError:
            raise CheckpointError(f"{hf_dir}: tensor {key!r} has no counterpart in model.py") from None
    return file_source([os.path.join(hf_dir, f) for f in files], rename)


def load_hf(hf_dir, dtype=torch.float32, device="cpu"):
    """A transformers Llama/Qwen3 checkpoint directory -> Transformer with equal logits."""
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
        model_cfg = config_from_hf(hf, path)
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable Hugging Face config ({type(e).__name__}: {e})") from None
    return build_model(Config(model=model_cfg), device, hf_source(hf_dir, model_cfg), where=hf_dir).to(dtype)
