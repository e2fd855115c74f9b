"""checkpoint.py — weights and training state on disk, and the one way from weights to a model.

    cfg, model = checkpoint.load_model("runs/demo/checkpoints/step_0000600")   # eval, infer, your scripts
    model = checkpoint.load_hf("hf/")   # a transformers Llama/Qwen3 directory in; save_hf(model, dir) out
    python checkpoint.py export CKPT_DIR OUT_DIR                               # to transformers' format

A checkpoint is step_NNNNNNN/, written under a temporary name and renamed once complete:
model-RRRRR.safetensors and optimizer-RRRRR.safetensors, the pieces rank R owns (its slice of
a tensor-parallel tensor, its ZeRO slice, one copy of a replicated tensor); index.json, each
tensor's whole shape and which file holds which box of it; state.json, config.toml,
tokenizer.json and manifest.json (bytes and sha256 of each file). Every model, fresh, resumed,
evaluated, served or imported, is built by `build_model`: on the meta device, cut to this
rank's part of the layout, then each parameter filled with its piece of a whole tensor, read
(memory-mapped, only the boxes it needs) or drawn by the initialiser.
"""
import json
import math
import os
import re
import shutil
import threading
import zlib
from functools import partial

import torch
import torch.distributed as dist
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
    (an 8B model in fp32 would be 32 GB on every rank). weights may be a Hugging Face directory."""
    grid = grid or parallel.Grid()
    with torch.device("meta"):
        model = Transformer(cfg.model)
    parallel.parallelize(model, grid, cfg.parallel)
    model.to_empty(device=device)
    if weights is None:
        weights, where = init_source(cfg.model, cfg.data.seed, device), "init"
    elif isinstance(weights, str):
        weights, where = weights_source(weights, cfg.model), weights
    fill(model, model.named_parameters(), weights, grid, where)
    return model


def fill(model, targets, source, grid, where):
    """Copy into each (name, tensor) of targets its piece of the source's tensor of that name:
    a parameter of this rank's part of the model, or a ZeRO slice of one (parallel.piece_of).
    The source is first checked against the whole model's names and shapes."""
    with torch.device("meta"):
        whole = {n: tuple(p.shape) for n, p in Transformer(model.cfg).named_parameters()}
    for what, names in (("missing", whole.keys() - source.keys()), ("unexpected", source.keys() - whole.keys())):
        if names:
            raise CheckpointError(f"{where}: {what} tensors {sorted(names)[:5]}")
    if wrong := [f"{n} is {source[n][0]}, the model's is {s}" for n, s in whole.items() if tuple(source[n][0]) != s]:
        raise CheckpointError(f"{where}: shapes differ from the model's config: " + "; ".join(wrong[:3]))
    with torch.no_grad():
        for name, t in targets:
            name = parallel.canonical(name, grid)
            t.copy_(source[name][1](*parallel.piece_of(name, t, grid)).view_as(t))


def load_weights(model, dp, named, path, grid):
    """A checkpoint's (or Hugging Face directory's) weights into a built run: under ZeRO each
    rank reads only its slices and all-gathers the rest (ZeRO-3's blocks gather on use)."""
    fill(model, named if dp.zero else model.named_parameters(), weights_source(path, model.cfg), grid, path)
    dp.after_step()


def weights_source(path, model_cfg):
    """A source over the weights of a training checkpoint or a Hugging Face directory, refused
    with the fields that differ when its config does not describe model_cfg. The caller has
    verified a checkpoint (verify_checkpoint reads every file, every rank need not)."""
    hf = os.path.exists(os.path.join(path, "config.json"))
    if not hf and not os.path.exists(os.path.join(path, "config.toml")):
        raise CheckpointError(f"{path}: neither a checkpoint (config.toml) nor a Hugging Face directory (config.json)")
    saved = read_hf_config(path) if hf else load_config(os.path.join(path, "config.toml")).model
    if differ := [f"model.{k} is {getattr(saved, k)!r} there, {getattr(model_cfg, k)!r} here" for k in vars(saved)
                  if k not in ("init_std", "max_seq_len", "value_head", "vocab_multiple" if hf else "") and
                  getattr(saved, k) != getattr(model_cfg, k)]:
        raise CheckpointError(f"{path} holds another model: " + "; ".join(differ))
    source = hf_source(path, model_cfg) if hf else checkpoint_source(path)
    if not model_cfg.value_head:  # a reward or PPO model's weights serve as a language model's
        source.pop("value_head.weight", None)
    elif "value_head.weight" not in source:  # a language model starts a reward model: a fresh head, at zero
        source.update(tensor_source({"value_head.weight": torch.zeros(1, model_cfg.d_model)}))
    return source


# A box is a [start, stop) per dimension of a whole tensor. Files hold boxes; a rank wants the
# box of its tensor-parallel part, or a flat range of it (a ZeRO slice), which is a few boxes.

def part_box(shape, spec):
    """The box of this rank's tensor-parallel part (parallel.shard_spec) of a tensor of shape."""
    box = [(0, n) for n in shape]
    if spec is not None and shape:
        dim, index, count = spec
        n = shape[dim] // count
        box[dim] = (index * n, (index + 1) * n)
    return box


def flat_boxes(box, start, stop):
    """The flat range [start, stop) of the row-major box as boxes, in order: a partial first
    row, whole rows, a partial last row (a row being everything past the first dimension;
    partial rows are cut the same way, one dimension down)."""
    (r0, _), *inner = box
    if not inner:
        return [[(r0 + start, r0 + stop)]]
    width, boxes = math.prod(b - a for a, b in inner), []
    while start < stop:
        row, col = divmod(start, width)
        if col or stop - start < width:   # part of one row
            end = min(stop, (row + 1) * width)
            boxes += [[(r0 + row, r0 + row + 1), *b] for b in flat_boxes(inner, col, col + end - start)]
        else:                             # whole rows
            end = start + (stop - start) // width * width
            boxes.append([(r0 + row, r0 + end // width), *inner])
        start = end
    return boxes


def read_boxes(pieces, shape, spec, flat=None):
    """This rank's part (spec) of a whole tensor, or the flat range `flat` of that part,
    assembled from the stored pieces [(box, load(sub-box of it) -> tensor)] it overlaps."""
    box = part_box(shape, spec)
    wanted = flat_boxes(box, *flat) if flat else [box]
    out = []
    for want in wanted:
        buf = None
        for have, load in pieces:
            inter = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(want, have)]
            if all(a < b for a, b in inter):
                part = load([(a - c, b - c) for (a, b), (c, _) in zip(inter, have)])
                if inter == want:  # one stored piece holds it all (the layout that wrote it): no copy
                    buf = part
                    break
                buf = torch.zeros([b - a for a, b in want], dtype=part.dtype) if buf is None else buf  # 0: padding
                buf[tuple(slice(a - w, b - w) for (a, b), (w, _) in zip(inter, want))] = part
        out.append(buf)
    return torch.cat([t.flatten() for t in out]) if flat else out[0]


def init_source(model_cfg: ModelConfig, seed, device):
    """Each tensor drawn whole by model.init_parameter from a generator of its own, seeded with
    the seed and its name: the weights do not depend on the layout or on which rank draws.
    Padded vocabulary rows (model.vocab_multiple) are zeros, the rest as unpadded."""
    def draw(name, shape, spec, flat=None):
        generator = torch.Generator(device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        real = (model_cfg.vocab_size, *shape[1:]) if name in ("embed.weight", "lm_head.weight") else shape
        whole = init_parameter(name, torch.empty(real, device=device), model_cfg, generator)
        whole = torch.cat([whole, whole.new_zeros(shape[0] - real[0], *shape[1:])]) if real != shape else whole
        return tensor_source({name: whole})[name][1](spec, flat)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Transformer(model_cfg).named_parameters()}
    return {n: (s, partial(draw, n, s)) for n, s in shapes.items()}


def tensor_source(tensors):
    """A source over whole tensors in memory."""
    def load(t, box):
        return t[tuple(slice(a, b) for a, b in box)]
    return {n: (tuple(t.shape), partial(read_boxes, [(part_box(t.shape, None), partial(load, t))], tuple(t.shape)))
            for n, t in tensors.items()}


def load_box(path, key, box):
    with safe_open(path, "pt") as f:
        return f.get_slice(key)[tuple(slice(a, b) for a, b in box)] if box else f.get_tensor(key)


def file_source(paths, rename=lambda key: key, padded=None):
    """A source over whole tensors in safetensors files (a Hugging Face checkpoint). rename maps a key on disk to
    model.py's name, to (name, e) for expert e of a stacked (E, ...) tensor stored one expert per key, or to None to
    skip it; padded {name: shape} gives a tensor a larger whole shape, whose part past the file's reads as zeros."""
    pieces, shapes = {}, {}
    for path in paths:
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: missing weights file")
        with safe_open(path, "pt") as f:
            for key in f.keys():
                if (name := rename(key)) is None:
                    continue
                shape, load = tuple(f.get_slice(key).get_shape()), partial(load_box, path, key)
                if isinstance(name, tuple):  # expert e: the box [e, e + 1) of the stacked tensor
                    name, e = name
                    pieces.setdefault(name, []).append(([(e, e + 1), *part_box(shape, None)],
                                                        lambda box, load=load: load(box[1:])[None]))
                    shape = (max(e + 1, shapes.get(name, (0,))[0]), *shape)
                else:
                    pieces[name] = [(part_box(shape, None), load)]
                shapes[name] = (padded or {}).get(name, shape)
    return {name: (shape, partial(read_boxes, pieces[name], shape)) for name, shape in shapes.items()}


def checkpoint_source(path, kind="model"):
    """A source over a checkpoint's model or optimizer tensors, through its index.json: each
    read opens only the pieces that overlap the boxes wanted."""
    index = os.path.join(path, "index.json")
    try:
        with open(index) as f:
            tensors = json.load(f)[kind]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{index}: unreadable checkpoint index ({type(e).__name__}: {e})") from None
    return {name: (tuple(t["shape"]), partial(read_boxes, [(box, partial(load_box, os.path.join(path, file), key))
                                                          for file, key, box in t["pieces"]], tuple(t["shape"])))
            for name, t in tensors.items()}


def load_model(path, device="cpu"):
    """(config, model) from a checkpoint directory, checked against its manifest first."""
    verify_checkpoint(path)
    cfg = load_config(os.path.join(path, "config.toml"))
    return cfg, build_model(cfg, device, weights=path)


def load_optimizer_state(optimizer, named, path, grid):
    """Put a checkpoint's AdamW state back: for each tensor the optimizer updates (a parameter, or under ZeRO its
    slice), the same piece of each moment. `step` goes where torch's own load_state_dict puts it: on the parameter's
    device for fused or capturable AdamW (their kernels reject a CPU step on CUDA), on the CPU otherwise."""
    source = checkpoint_source(path, "optimizer")
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for name, t in named:
        if f"{name}.exp_avg" in source:  # Muon's matrices have no exp_avg_sq
            piece = parallel.piece_of(name, t, grid)
            state = {k: source[f"{name}.{k}"][1](*piece).view_as(t).to(t.device) for k in ("exp_avg", "exp_avg_sq")
                     if f"{name}.{k}" in source}
            step = source[f"{name}.step"][1](None)
            optimizer.state[t] = {**state, "step": step.to(t.device) if on_device else step.float().cpu()}


# ----------------------------------------------------------------------------------------
# Writing, retention, integrity

def step_dirs(ckpt_dir):
    """Finished checkpoints, oldest first."""
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    return sorted(os.path.join(ckpt_dir, d) for d in names if d.startswith("step_"))


def snapshot(model, named, optimizer, grid, zero):
    """The pieces this rank writes, as CPU copies (what an asynchronous writer writes while training goes on):
    {"model" | "optimizer": [(name, whole shape, box, tensor)]}. A rank writes its ZeRO slices or, without ZeRO, its
    whole part if it is dp and cp rank 0 (its experts if it is in the first group of ep ranks); a tensor held whole by
    every tp rank (or a tied head, by both end stages) by one of them."""
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Transformer(model.cfg).named_parameters()}
    def writes(name):
        return grid.cp_rank == 0 and (grid.dp_rank == 0 or name in grid.ep_sharded and grid.dp_rank < grid.ep)
    mine = named if zero else [(parallel.canonical(n, grid), p) for n, p in model.named_parameters() if writes(n)]
    out = {"model": [], "optimizer": []}
    for name, t in ((n, t) for n, t in mine if parallel.counts_once(n, grid)):
        spec, flat = parallel.piece_of(name, t, grid)
        boxes = flat_boxes(part_box(shapes[name], spec), *flat) if flat else [part_box(shapes[name], spec)]
        state = optimizer.state.get(t, {})
        for kind, key, value in [("model", name, t)] + [("optimizer", f"{name}.{k}", state[k]) for k in
                                                        ("exp_avg", "exp_avg_sq") if k in state]:
            parts = value.detach().flatten().split([math.prod(b - a for a, b in box) for box in boxes])
            out[kind] += [(key, shapes[name], box, p.view([b - a for a, b in box]).to("cpu", copy=True))
                          for box, p in zip(boxes, parts)]
        if "step" in state and (spec is None or spec[1] == 0) and (flat is None or flat[0] == 0):  # one copy
            out["optimizer"].append((f"{name}.step", (), [], state["step"].to("cpu", copy=True)))
    return out


def save_checkpoint(ckpt_dir, step, pieces, state, cfg, permanent=False, rank=0, group=None):
    """Write step_NNNNNNN atomically, every rank its own pieces (snapshot) into a temporary directory; rank 0 then
    writes the index of where every piece is, the state, and the manifest of every rank's files and their sha256,
    renames the directory, and drops old checkpoints beyond the newest checkpoint.keep, except permanent ones. `group`
    (a gloo group of every rank) lets ranks wait for each other from the writer thread."""
    final, tmp = (os.path.join(ckpt_dir, f"{p}step_{step:07d}") for p in ("", ".tmp_"))
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if group is not None:
        dist.barrier(group=group)
    try:
        placed, files = [], {}  # (kind, key, whole shape, [file, key in the file, box]) of each piece
        for kind, entries in pieces.items():
            name = f"{kind}-{rank:05d}.safetensors"
            tensors = {f"{key}#{i}": t.contiguous() for i, (key, _, _, t) in enumerate(entries)}
            placed += [(kind, key, shape, [name, f"{key}#{i}", box]) for i, (key, shape, box, _) in enumerate(entries)]
            if tensors:
                save_file(tensors, os.path.join(tmp, name))
                files[name] = {"bytes": os.path.getsize(os.path.join(tmp, name)),
                               "sha256": file_sha256(os.path.join(tmp, name))}
        mine = (placed, files)
    except Exception as e:  # noqa: BLE001 — sent to rank 0, which reports it; nothing is renamed
        mine = e
    gathered = [mine]
    if group is not None:
        gathered = [None] * dist.get_world_size(group) if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0, group=group)
    if rank != 0:
        return None
    if errors := [result for result in gathered if isinstance(result, Exception)]:
        raise errors[0]
    index = {"model": {}, "optimizer": {}}
    for kind, key, shape, piece in (p for rank_placed, _ in gathered for p in rank_placed):
        index[kind].setdefault(key, {"shape": shape, "pieces": []})["pieces"].append(piece)
    for name, text in (("index.json", json.dumps(index)), ("state.json", json.dumps(state)),
                       ("config.toml", to_toml(cfg))):
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)
    # An alignment run has no token shards: its tokenizer is the one of the model it started from.
    shutil.copyfile(data.tokenizer_path(cfg.data.train) if cfg.data.train else
                    os.path.join(cfg.train.init_from, "tokenizer.json"), os.path.join(tmp, "tokenizer.json"))
    files = {n: meta for _, rank_files in gathered for n, meta in rank_files.items()}
    files.update({n: {"bytes": os.path.getsize(os.path.join(tmp, n)), "sha256": file_sha256(os.path.join(tmp, n))}
                  for n in ("index.json", "state.json", "config.toml", "tokenizer.json")})
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump({"step": step, "keep": permanent, "files": dict(sorted(files.items()))}, f, indent=1)
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
    """Runs checkpoint writes on a background thread from a CPU snapshot, so training goes on while files are written; a
    new write (or the end of training) first waits for the previous one. A failed write is reported, never silently
    lost; the checkpoints already on disk are untouched because a write only becomes visible by its final rename."""

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
        error, self.error, self.thread = self.error, None, None
        return error


# ----------------------------------------------------------------------------------------
# Hugging Face format: config.json + model.safetensors with transformers' key names.
# Our names differ from transformers' only by these patterns ({i} is a layer index).

HF_NAMES = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.attn.{w}.weight", "model.layers.{i}.self_attn.{w}.weight"),
    ("layers.{i}.mlp.router.weight", "model.layers.{i}.block_sparse_moe.gate.weight"),  # Mixtral
    ("layers.{i}.mlp.{w}.weight", "model.layers.{i}.mlp.{w}.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]
# transformers' Mamba (MambaForCausalLM): a backbone of mixers, each layer one norm and mixer.
MAMBA_NAMES = [
    ("embed.weight", "backbone.embeddings.weight"),
    ("layers.{i}.mamba_norm.weight", "backbone.layers.{i}.norm.weight"),
    ("layers.{i}.mamba.{p}", "backbone.layers.{i}.mixer.{p}"),  # {p}: conv1d.weight, A_log, ...
    ("norm.weight", "backbone.norm_f.weight"),
    ("lm_head.weight", "lm_head.weight"),
]
# Mixtral stores each expert's projections apart; model.py stacks them: (name, e) <-> key.
EXPERT_KEY = "model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def hf_rename(name, reverse=False, names=HF_NAMES):
    """Our name -> transformers' (or back with reverse); a KeyError for a name with no counterpart.
    A Mixtral expert's key gives (stacked name, expert index). names: MAMBA_NAMES for Mamba."""
    expert = r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight"
    if reverse and (m := re.fullmatch(expert, name)):
        ours = {w: n for n, w in EXPERT_NAMES.items()}[m[3]]
        return f"layers.{m[1]}.mlp.{ours}", int(m[2])
    for ours, theirs in names:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        pattern = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{w\}", r"(?P<w>\w+)")
        if m := re.fullmatch(pattern.replace(r"\{p\}", r"(?P<p>[\w.]+)"), name):
            return dst.format(**m.groupdict())
    raise KeyError(name)


def save_hf(model, out_dir, dtype=torch.float32):
    """Write config.json and model.safetensors that transformers' LlamaForCausalLM (or Qwen3ForCausalLM when the model
    uses QK-norm, MixtralForCausalLM when it has experts) loads with equal logits."""
    c = model.cfg
    if c.width_mult != 1:
        raise CheckpointError("model.mup: its logit and attention multipliers have no counterpart in transformers' "
                              "causal LMs; not exported")
    if c.value_head:  # PPO's value (or a reward model's score): the language model is exported without it
        print("export: model.value_head has no place in a causal LM: left out")
    if "M" in c.block_pattern:
        return save_mamba_hf(model, out_dir, dtype)
    arch, model_type = ("Qwen3ForCausalLM", "qwen3") if c.qk_norm else ("LlamaForCausalLM", "llama")
    if c.moe_experts:
        if c.moe_every != 1 or c.moe_shared_experts or c.qk_norm:
            raise CheckpointError("Mixtral has experts in every layer, no shared expert and no QK-norm: this model "
                                  "(model.moe_every, moe_shared_experts, qk_norm) has no Hugging Face counterpart here")
        arch, model_type = "MixtralForCausalLM", "mixtral"
    config = {"architectures": [arch], "model_type": model_type, "vocab_size": c.vocab_size, "hidden_size": c.d_model,
              "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
              "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "max_position_embeddings": c.max_seq_len,
              "rms_norm_eps": c.norm_eps,
              # transformers < 5 reads rope_theta, >= 5 reads rope_parameters: write both.
              "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
              "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
              "mlp_bias": False, "initializer_range": c.init_std, "torch_dtype": str(dtype).removeprefix("torch.")}
    if c.moe_experts:  # Mixtral's intermediate_size is an expert's; it is dropless, like moe_capacity_factor 0
        config.update(intermediate_size=c.moe_d_ff, num_local_experts=c.moe_experts,
                      num_experts_per_tok=c.moe_top_k, router_aux_loss_coef=c.moe_aux_loss, sliding_window=None)
    # A tied head is the embedding: store it once, as transformers does; padded rows are cut.
    tensors = {}
    for n, p in ((n, p) for n, p in model.named_parameters() if n != "value_head.weight"):
        p = p.detach()[:c.vocab_size if n in ("embed.weight", "lm_head.weight") else None].to(dtype).cpu()
        if p.dim() == 3:  # stacked experts, one key each
            i, w = re.fullmatch(r"layers\.(\d+)\.mlp\.(\w+)", n).groups()
            tensors.update({EXPERT_KEY.format(i=i, e=e, w=EXPERT_NAMES[w]): t.contiguous() for e, t in enumerate(p)})
        else:
            tensors[hf_rename(n)] = p.contiguous()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def save_mamba_hf(model, out_dir, dtype):
    """MambaForCausalLM: pure Mamba models (every layer "M", no experts, a tied head)."""
    c = model.cfg
    if set(c.block_pattern.replace(" ", "")) != {"M"} or c.moe_experts or not c.tie_embeddings:
        raise CheckpointError("transformers' Mamba has Mamba layers only, no experts and a tied head: this model "
                              "(model.block_pattern, moe_experts, tie_embeddings) has no Hugging Face counterpart here")
    config = {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "vocab_size": c.vocab_size,
              "hidden_size": c.d_model, "state_size": c.ssm_state, "num_hidden_layers": c.n_layers,
              "layer_norm_epsilon": c.norm_eps, "expand": c.ssm_expand, "conv_kernel": c.ssm_conv,
              "use_bias": False, "use_conv_bias": True, "hidden_act": "silu", "time_step_rank": c.ssm_dt_rank,
              "tie_word_embeddings": True, "initializer_range": c.init_std,
              "torch_dtype": str(dtype).removeprefix("torch.")}
    tensors = {hf_rename(n, names=MAMBA_NAMES): p.detach()[:c.vocab_size if n == "embed.weight" else None]
               .to(dtype).contiguous().cpu() for n, p in model.named_parameters() if n != "lm_head.weight"}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def config_from_hf(hf, where="config.json"):
    """ModelConfig from a transformers config.json dict (Llama, Qwen3, Mixtral or Mamba)."""
    if hf.get("model_type") not in ("llama", "qwen3", "mixtral", "mamba"):
        raise CheckpointError(f"{where}: model_type {hf.get('model_type')!r} is not supported "
                              "(llama, qwen3, mixtral, mamba)")
    if hf["model_type"] == "mamba":
        if hf.get("use_bias") or not hf.get("use_conv_bias", True) or hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: only Mamba without linear biases, with a conv bias and silu is supported")
        rank = hf.get("time_step_rank", "auto")
        return ModelConfig(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=1,
            n_kv_heads=1, block_pattern="M" * hf["num_hidden_layers"], ssm_dt_rank=0 if rank == "auto" else rank,
            ssm_state=hf.get("state_size", 16), ssm_conv=hf.get("conv_kernel", 4), ssm_expand=hf.get("expand", 2),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True),
            max_seq_len=hf.get("max_position_embeddings", 2048))
    if hf.get("sliding_window") and hf["sliding_window"] < hf.get("max_position_embeddings", 2048):
        raise CheckpointError(f"{where}: sliding_window attention ({hf['sliding_window']}) is not supported")
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
        qk_norm=hf["model_type"] == "qwen3", init_std=hf.get("initializer_range", 0.02),
        **(dict(moe_experts=hf["num_local_experts"], moe_top_k=hf["num_experts_per_tok"],
                moe_aux_loss=hf.get("router_aux_loss_coef", 0.01)) if hf["model_type"] == "mixtral" else {}))


def hf_source(hf_dir, cfg):
    """A source over a transformers checkpoint, one file or sharded (model.safetensors.index.json),
    for a model of cfg: the embedding and head padded with zero rows to cfg.padded_vocab."""
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
            return hf_rename(key, reverse=True, names=MAMBA_NAMES if "M" in cfg.block_pattern else HF_NAMES)
        except KeyError:
            raise CheckpointError(f"{hf_dir}: tensor {key!r} has no counterpart in model.py") from None
    padded = dict.fromkeys(("embed.weight", "lm_head.weight"), (cfg.padded_vocab, cfg.d_model))
    return file_source([os.path.join(hf_dir, f) for f in files], rename, padded)


def read_hf_config(hf_dir):
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            return config_from_hf(json.load(f), path)
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable Hugging Face config ({type(e).__name__}: {e})") from None


def load_hf(hf_dir, dtype=torch.float32, device="cpu"):
    """A transformers Llama/Qwen3 checkpoint directory -> Transformer with equal logits."""
    model_cfg = read_hf_config(hf_dir)
    return build_model(Config(model=model_cfg), device, hf_source(hf_dir, model_cfg), where=hf_dir).to(dtype)


# ----------------------------------------------------------------------------------------
# Export: a training checkpoint -> a directory that transformers' AutoModelForCausalLM and
# AutoTokenizer load with no other file: `python checkpoint.py export CKPT_DIR OUT_DIR`.

def export_hf(ckpt_dir, out_dir, dtype=torch.float32):
    """Write model, tokenizer, chat template and generation ids; return the files written."""
    from tokenizers import Tokenizer

    from prep.tokenizer import BOS, CHAT_TEMPLATE, EOS, PAD
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise CheckpointError(f"{out_dir}: exists and is not empty; refusing to overwrite it, give a new directory")
    _, model = load_model(ckpt_dir)
    tok_path = os.path.join(ckpt_dir, "tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    ids = {t: tok.token_to_id(t) for t in (BOS, EOS, PAD, "<|end|>")}
    if None in ids.values():
        raise CheckpointError(f"{tok_path}: no {[t for t, i in ids.items() if i is None]} token(s)")
    save_hf(model, out_dir, dtype)
    shutil.copyfile(tok_path, os.path.join(out_dir, "tokenizer.json"))
    # tokenizer.json marks the specials special (never split, skipped by skip_special_tokens),
    # so no added_tokens_decoder is needed. Cleaning up spaces (" ," -> ",") would not decode
    # to the text that was encoded; transformers before 4.45 did it by default, so say no.
    files = {"tokenizer_config.json": {
                 "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
                 "model_max_length": model.cfg.max_seq_len, "clean_up_tokenization_spaces": False,
                 "chat_template": CHAT_TEMPLATE},
             # A chat model ends its turn with <|end|>; a plain continuation with <|eos|>.
             "generation_config.json": {"bos_token_id": ids[BOS], "eos_token_id": [ids["<|end|>"], ids[EOS]],
                                        "pad_token_id": ids[PAD]}}
    for name, content in files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2)
    return sorted(os.listdir(out_dir))


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    export = p.add_subparsers(dest="command", required=True).add_parser(
        "export", help="a training checkpoint -> a Hugging Face directory (model, tokenizer, chat template)")
    export.add_argument("ckpt_dir", help="a checkpoint directory (step_NNNNNNN)")
    export.add_argument("out_dir", help="a new or empty directory")
    export.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = p.parse_args(argv)
    try:
        written = export_hf(args.ckpt_dir, args.out_dir, getattr(torch, args.dtype))
    except (ValueError, OSError) as e:  # bad input: one line naming the file and what is wrong
        raise SystemExit(f"error: {e}") from None
    print(f"{args.out_dir}: wrote {', '.join(written)}")


if __name__ == "__main__":
    main()
