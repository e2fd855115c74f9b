"""data.py — token shards on disk to (input, target) batches.

A shard is NAME.bin (flat token ids) + NAME.json (dtype, count, lineage), written by prep/shards.py. The loader cuts
every shard into windows of seq_len + 1 tokens (input = window[:-1], target = window[1:]; neighbouring windows share
one token), shuffles the window order once per epoch with a seeded generator, and walks it: each optimizer micro-step
takes the next micro_batch * dp windows and data-parallel rank r reads its own micro_batch of them. The position in
that walk is the whole loader state, so a resumed run — under any data-parallel width with the same global batch —
reads exactly the windows it would have read.
"""
import glob
import json
import os
import re

import numpy as np
import torch


def find_shards(pattern, key="data.train"):
    """Shard paths for a glob ('dir/train_*.bin') or a single .bin file, sorted."""
    paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    paths = [p for p in paths if p.endswith(".bin")]
    if not paths or not all(os.path.exists(p) for p in paths):
        raise FileNotFoundError(f"{key}: no token shards match {pattern!r} (expected .bin files written by "
                                "`python -m prep tokenize`)")
    return paths


def read_text(path):
    """A UTF-8 file's text, or a ValueError naming the file when it is not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def read_sidecar(path):
    """The JSON sidecar of shard path (NAME.bin -> NAME.json)."""
    sidecar = path[:-len(".bin")] + ".json"
    try:
        with open(sidecar) as f:
            meta = json.load(f)
        meta["dtype"], meta["tokens"] = np.dtype(meta["dtype"]), int(meta["tokens"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{sidecar}: unreadable shard sidecar ({type(e).__name__}: {e})") from None
    return meta


def open_shard(path):
    """Memory-map a shard after checking it against its sidecar."""
    meta = read_sidecar(path)
    dtype, n = meta["dtype"], meta["tokens"]
    if (size := os.path.getsize(path)) != n * dtype.itemsize:
        raise ValueError(f"{path}: {size} bytes on disk, but its sidecar says {n} {dtype.name} tokens "
                         f"({n * dtype.itemsize} bytes): truncated or corrupt shard")
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def check_shards(patterns, vocab_size):
    """Stop before training unless every shard of patterns ({config key: glob}) comes from one
    tokenizer whose ids the model has rows for: an id past model.vocab_size reads out of
    bounds in the Triton loss and, under tensor parallelism, silently embeds as zeros."""
    first = None
    for key, pattern in patterns.items():
        for path in find_shards(pattern, key):
            meta = read_sidecar(path)
            ident = {k: meta.get(k) for k in ("tokenizer_sha256", "vocab_size", "bos_id")}
            first = first or (path, ident)
            if differs := [k for k in ident if ident[k] != first[1][k]]:
                k = differs[0]
                raise ValueError(f"{key}: {path} was made with {k} = {ident[k]!r}, but {first[0]} with "
                                 f"{first[1][k]!r}: shards of different tokenizers")
    if (first[1]["vocab_size"] or 0) > vocab_size:
        raise ValueError(f"{first[0]}: its tokenizer has vocab_size = {first[1]['vocab_size']}, more than "
                         f"model.vocab_size = {vocab_size}")


def tokenizer_path(spec):
    """The tokenizer.json that prep copied next to the shards (of the first source of a mixture)."""
    path = os.path.join(os.path.dirname(find_shards(next(iter(sources(spec).values())))[0]), "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no tokenizer.json next to the token shards")
    return path


def token_byte_lengths(tokenizer_path):
    """UTF-8 bytes of text each token id stands for (0 for special tokens): the denominator of bits per byte. Each id is
    decoded through the tokenizer after an anchor token, so a SentencePiece-style leading "\u2581" counts as the space
    it stands for. An id that decodes to U+FFFD is part of a character: byte fallback's <0xE4> is one byte, and a
    byte-level BPE token holds one byte per character of its string (GPT-2's byte-to-unicode map)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tokenizer_path)
    anchor = tok.encode("a", add_special_tokens=False).ids[-1]
    head, lengths = tok.decode([anchor]), []
    pairs = [[anchor, i] for i in range(tok.get_vocab_size(with_added_tokens=True))]
    for i, text in enumerate(tok.decode_batch(pairs)):  # special tokens are skipped: they decode to ""
        rest, token = text[len(head):], tok.id_to_token(i)
        lengths.append(len(rest.encode()) if "\ufffd" not in rest else
                       1 if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token) else len(token))
    return lengths


class Loader:
    def __init__(self, pattern, seq_len, micro_batch, rank=0, world=1, seed=0, shuffle=True, key="data.train"):
        self.shards = [open_shard(p) for p in find_shards(pattern, key)]
        self.seq_len, self.micro_batch, self.rank, self.world = seq_len, micro_batch, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.starts = np.cumsum([0] + [(len(s) - 1) // seq_len for s in self.shards])  # window -> shard: searchsorted
        self.n_windows = int(self.starts[-1])
        if self.n_windows < micro_batch * world:
            raise ValueError(f"{key}: {self.n_windows} windows of {seq_len + 1} tokens, fewer than one "
                             f"global micro-batch ({micro_batch} x {world} ranks)")
        self.epoch, self.pos, self._order = 0, 0, None
        self.skip = set()      # (epoch, pos) of global batches never to read again (loss spikes)
        self.last_batch = None  # (epoch, pos) of the batch just returned: its id in logs

    def order(self):
        """This epoch's window order; the same for a seed and epoch on every rank."""
        if self._order is None:
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows) if self.shuffle
                           else np.arange(self.n_windows))
        return self._order

    def window(self, w):
        s = int(np.searchsorted(self.starts, w, side="right")) - 1
        start = (w - self.starts[s]) * self.seq_len
        return torch.from_numpy(self.shards[s][start:start + self.seq_len + 1].astype(np.int64))

    def advance(self, n):
        """The ids of the next n windows of the walk, all from one epoch's order (an incomplete
        tail is left to the next epoch's); last_batch is their place, (epoch, position)."""
        if self.pos + n > self.n_windows:
            self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        self.last_batch = (self.epoch, self.pos)
        self.pos += n
        return self.order()[self.pos - n:self.pos]

    def next_batch(self):
        """(inputs, targets), both (micro_batch, seq_len) int64, for this rank."""
        ids = self.advance(self.micro_batch * self.world)
        while self.last_batch in self.skip:  # a batch that made the loss spike is never read again
            ids = self.advance(self.micro_batch * self.world)
        batch = torch.stack([self.window(int(w)) for w in ids[self.rank * self.micro_batch:][:self.micro_batch]])
        return batch[:, :-1], batch[:, 1:]                            # (micro_batch, seq_len) each

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "seq_len": self.seq_len,
                "n_windows": self.n_windows, "skip": sorted(self.skip)}

    def load_state_dict(self, state):
        for key in ("seed", "seq_len", "n_windows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state[key]}, this run has "
                                 f"{getattr(self, key)}: the data or its settings changed")
        self.epoch, self.pos, self._order = state["epoch"], state["pos"], None
        self.skip = {tuple(b) for b in state.get("skip", [])}


class Mixture:
    """Windows drawn from weighted sources ([data] train as a table). Each slot of a global batch
    draws its source with the sources' weights from a generator seeded with the seed and the
    batch number, the same draw on every rank, and each source walks its own shuffled windows;
    rank r reads slots r * micro_batch onwards. State: the batch number and each source's walk."""

    def __init__(self, sources, seq_len, micro_batch, rank=0, world=1, seed=0, key="data.train"):
        self.loaders = {name: Loader(s["path"], seq_len, 1, seed=seed + i, key=f"{key}.{name}")
                        for i, (name, s) in enumerate(sources.items())}
        weights = np.array([s["weight"] for s in sources.values()], dtype=np.float64)
        self.p = weights / weights.sum()
        self.seq_len, self.micro_batch, self.rank, self.world = seq_len, micro_batch, rank, world
        self.seed, self.step, self.skip, self.last_batch = seed, 0, set(), None
        self.windows = dict.fromkeys(self.loaders, 0)  # drawn from each source, by every rank together

    def next_batch(self):
        names, n = list(self.loaders), self.micro_batch * self.world
        while True:
            self.last_batch = (0, self.step)
            rng = np.random.default_rng([self.seed, self.step])
            drawn = [(names[i], self.loaders[names[i]].advance(1)[0]) for i in rng.choice(len(names), n, p=self.p)]
            self.step += 1
            for name, _ in drawn:
                self.windows[name] += 1
            if self.last_batch not in self.skip:
                break
        mine = drawn[self.rank * self.micro_batch:][:self.micro_batch]
        batch = torch.stack([self.loaders[name].window(int(w)) for name, w in mine])
        return batch[:, :-1], batch[:, 1:]

    def epochs(self):
        """{source: epochs walked}: past 1 its windows repeat."""
        return {n: loader.epoch + loader.pos / loader.n_windows for n, loader in self.loaders.items()}

    def state_dict(self):
        return {"step": self.step, "skip": sorted(self.skip), "windows": self.windows,
                "sources": {n: loader.state_dict() for n, loader in self.loaders.items()}}

    def load_state_dict(self, state):
        if set(state.get("sources", ())) != set(self.loaders):
            raise ValueError(f"loader state was saved for the sources {sorted(state.get('sources', ()))}, this run "
                             f"has {sorted(self.loaders)}: the data mixture changed")
        for name, loader in self.loaders.items():
            loader.load_state_dict(state["sources"][name])
        self.step, self.windows = state["step"], dict(state["windows"])
        self.skip = {tuple(b) for b in state.get("skip", [])}


def sources(spec, key="data.train"):
    """{config key: glob} of a [data] train or val: a glob, or a table of named sources."""
    return {f"{key}.{n}": s["path"] for n, s in spec.items()} if isinstance(spec, dict) else {key: spec}


def make_loader(spec, seq_len, micro_batch, rank=0, world=1, seed=0, key="data.train"):
    if isinstance(spec, dict):
        return Mixture(spec, seq_len, micro_batch, rank, world, seed, key)
    return Loader(spec, seq_len, micro_batch, rank, world, seed, key=key)
