"""data.py — token shards on disk to (input, target) batches.

A shard is NAME.bin (flat token ids) + NAME.json (dtype, count, lineage), written by
prep/shards.py. The loader cuts every shard into windows of seq_len + 1 tokens (input =
window[:-1], target = window[1:]; neighbouring windows share one token), shuffles the
window order once per epoch with a seeded generator, and walks it: each optimizer
micro-step takes the next micro_batch * dp windows and data-parallel rank r reads its own
micro_batch of them. The position in that walk is the whole loader state, so a resumed
run — under any data-parallel width with the same global batch — reads exactly the
windows it would have read.
"""
import glob
import json
import os

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


def open_shard(path):
    """Memory-map a shard after checking it against its sidecar."""
    sidecar = path[:-len(".bin")] + ".json"
    try:
        with open(sidecar) as f:
            meta = json.load(f)
        dtype, n = np.dtype(meta["dtype"]), int(meta["tokens"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{sidecar}: unreadable shard sidecar ({type(e).__name__}: {e})") from None
    size = os.path.getsize(path)
    if size != n * dtype.itemsize:
        raise ValueError(f"{path}: {size} bytes on disk, but {sidecar} says {n} {dtype.name} tokens "
                         f"({n * dtype.itemsize} bytes): truncated or corrupt shard")
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def tokenizer_path(pattern):
    """The tokenizer.json that prep copied next to the shards."""
    path = os.path.join(os.path.dirname(find_shards(pattern)[0]), "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no tokenizer.json next to the token shards")
    return path


def token_byte_lengths(tokenizer_path):
    """Number of UTF-8 bytes each token id stands for (0 for special tokens): the
    denominator of bits per byte. Byte-level BPE maps each byte to one character, so a
    token's byte count is the length of its vocabulary string."""
    with open(tokenizer_path, encoding="utf-8") as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    lengths = [0] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        lengths[i] = len(token)
    for added in spec.get("added_tokens", []):
        if added["special"]:
            lengths[added["id"]] = 0
    return lengths


class Loader:
    def __init__(self, pattern, seq_len, micro_batch, rank=0, world=1, seed=0, shuffle=True, key="data.train"):
        self.shards = [open_shard(p) for p in find_shards(pattern, key)]
        self.seq_len, self.micro_batch, self.rank, self.world = seq_len, micro_batch, rank, world
        self.seed, self.shuffle = seed, shuffle
        counts = [(len(s) - 1) // seq_len for s in self.shards]
        self.starts = np.cumsum([0] + counts)  # window index -> shard via searchsorted
        self.n_windows = int(self.starts[-1])
        if self.n_windows < micro_batch * world:
            raise ValueError(f"{key}: {self.n_windows} windows of {seq_len + 1} tokens, fewer than one "
                             f"global micro-batch ({micro_batch} x {world} ranks)")
        self.epoch, self.pos = 0, 0
        self.skip = set()      # (epoch, pos) of global batches never to read again (loss spikes)
        self.last_batch = None  # (epoch, pos) of the batch just returned: its id in logs
        self._order = None

    def order(self):
        """This epoch's window order; the same for a seed and epoch on every rank."""
        if self._order is None:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            else:
                self._order = np.arange(self.n_windows)
        return self._order

    def window(self, w):
        s = int(np.searchsorted(self.starts, w, side="right")) - 1
        start = (w - self.starts[s]) * self.seq_len
        return torch.from_numpy(self.shards[s][start:start + self.seq_len + 1].astype(np.int64))

    def next_batch(self):
        """(inputs, targets), both (micro_batch, seq_len) int64, for this rank."""
        global_batch = self.micro_batch * self.world
        while True:
            if self.pos + global_batch > self.n_windows:  # the incomplete tail is left to the next epoch's order
                self.epoch, self.pos, self._order = self.epoch + 1, 0, None
            if (self.epoch, self.pos) not in self.skip:
                break
            self.pos += global_batch
        self.last_batch = (self.epoch, self.pos)
        ids = self.order()[self.pos + self.rank * self.micro_batch:][:self.micro_batch]
        self.pos += global_batch
        batch = torch.stack([self.window(int(w)) for w in ids])  # (micro_batch, seq_len + 1)
        return batch[:, :-1], batch[:, 1:]

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
