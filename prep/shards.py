"""Tokenization into training shards, in parallel worker processes.

Format (DESIGN.md): NAME.bin is a flat little-endian array of token ids (uint16 when the vocabulary fits, else
uint32); NAME.json beside it holds dtype, token and document counts, the UTF-8 bytes the tokens stand for, the
tokenizer's sha256 and the lineage of the input. Every document becomes [<|bos|>] + its tokens, so a window that
starts mid-stream still sees where documents begin. A document goes to val when a hash of its id says so: the split
is stable when documents are added or reordered.
"""
import hashlib
import json
import os
import shutil
import time
from multiprocessing import Pool

import numpy as np
from tokenizers import Tokenizer

from prep.readers import read_jsonl
from prep.tokenizer import BOS, file_sha256


def shard_dtype(vocab_size):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def write_shard(path, tokens, meta):
    """Write NAME.bin then NAME.json, each through a temporary name: a reader never
    sees a sidecar whose tokens are not fully on disk."""
    tokens.tofile(path + ".tmp")
    os.replace(path + ".tmp", path)
    sidecar = path[:-len(".bin")] + ".json"
    with open(sidecar + ".tmp", "w") as f:
        json.dump({"dtype": np.dtype(tokens.dtype).name, "tokens": int(tokens.size), **meta}, f, indent=1)
    os.replace(sidecar + ".tmp", sidecar)


def is_val(doc_id, val_fraction):
    h = int.from_bytes(hashlib.sha1(str(doc_id).encode()).digest()[:8], "little")
    return h / 2**64 < val_fraction


class ShardWriter:
    """Collects documents' tokens for one split and writes a shard every shard_tokens."""

    def __init__(self, out_dir, split, dtype, meta, shard_tokens, prefix=""):
        self.out_dir, self.split, self.dtype, self.meta, self.shard_tokens = out_dir, split, dtype, meta, shard_tokens
        self.prefix = prefix  # a pipeline task's number: shards of different tasks never collide
        self.parts, self.n_tokens, self.n_docs, self.n_bytes, self.shards = [], 0, 0, 0, []
        self.total = {"documents": 0, "tokens": 0, "bytes": 0}

    def add(self, ids, n_bytes):
        self.parts.append(ids)
        self.n_tokens += ids.size
        self.n_docs += 1
        self.n_bytes += n_bytes
        if self.n_tokens >= self.shard_tokens:
            self.flush()

    def flush(self):
        if not self.parts:
            return
        path = os.path.join(self.out_dir, f"{self.split}_{self.prefix}{len(self.shards):05d}.bin")
        write_shard(path, np.concatenate(self.parts).astype(self.dtype),
                    {"documents": self.n_docs, "bytes": self.n_bytes, **self.meta})
        self.shards.append(os.path.basename(path))
        for key, n in (("documents", self.n_docs), ("tokens", self.n_tokens), ("bytes", self.n_bytes)):
            self.total[key] += n
        self.parts, self.n_tokens, self.n_docs, self.n_bytes = [], 0, 0, 0


_tokenizer = None


def _load_tokenizer(path):
    global _tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the worker processes
    _tokenizer = Tokenizer.from_file(path)


def _encode(batch):
    """[(doc_id, text)] -> [(is_val, token ids without BOS, n_bytes)], in a worker."""
    encodings = _tokenizer.encode_batch([text for _, text, _ in batch], add_special_tokens=False)
    return [(val, np.asarray(e.ids, dtype=np.uint32), len(text.encode()))
            for (_, text, val), e in zip(batch, encodings)]


def _batches(docs, val_fraction, batch_docs):
    batch = []
    for doc in docs:
        batch.append((doc["id"], doc["text"], is_val(doc["id"], val_fraction)))
        if len(batch) == batch_docs:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_docs(docs, tokenizer_path, out_dir, lineage, workers=1, val_fraction=0.005, shard_tokens=1 << 24,
                  batch_docs=64, prefix=""):
    """Tokenize an iterable of documents into out_dir/{train,val}_{prefix}NNNNN.bin (+ .json
    sidecars). Returns {"train": {documents, tokens, bytes, shards}, "val": {...}}."""
    tok = Tokenizer.from_file(tokenizer_path)
    meta = {"vocab_size": tok.get_vocab_size(), "bos_id": tok.token_to_id(BOS),
            "tokenizer_sha256": file_sha256(tokenizer_path), "lineage": lineage}
    bos = np.array([meta["bos_id"]], dtype=np.uint32)
    writers = {s: ShardWriter(out_dir, s, shard_dtype(meta["vocab_size"]), meta, shard_tokens, prefix)
               for s in ("train", "val")}
    batches = _batches(docs, val_fraction, batch_docs)
    if workers > 1:
        pool = Pool(workers, initializer=_load_tokenizer, initargs=(tokenizer_path,))
        results = pool.imap(_encode, batches, chunksize=4)  # ordered: shards are reproducible
    else:
        _load_tokenizer(tokenizer_path)
        pool, results = None, map(_encode, batches)
    try:
        for encoded in results:
            for val, ids, n_bytes in encoded:
                writers["val" if val else "train"].add(np.concatenate([bos, ids]), n_bytes)
    finally:
        if pool:
            pool.close()
            pool.join()
    for w in writers.values():
        w.flush()
    return {s: {**w.total, "shards": w.shards} for s, w in writers.items()}


def summarize(splits, **extra):
    """The stats.json figures (train.py's report reads train/val documents, tokens, bytes and bytes_per_token)."""
    n = splits["train"]["tokens"] + splits["val"]["tokens"]
    return {**splits, **extra, "bytes_per_token": (splits["train"]["bytes"] + splits["val"]["bytes"]) / max(n, 1)}


def tokenize_to_shards(doc_paths, tokenizer_path, out_dir, workers=2, val_fraction=0.005,
                       shard_tokens=1 << 24, batch_docs=64):
    """Tokenize JSONL documents into out_dir/{train,val}_NNNNN.bin (+ .json sidecars),
    copy the tokenizer next to them, and write out_dir/stats.json. Returns the stats."""
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tokenizer.json"))
    lineage = {"inputs": [{"path": os.path.basename(p), "bytes": os.path.getsize(p), "sha256": file_sha256(p)}
                          for p in doc_paths], "val_fraction": val_fraction}
    errors = []
    docs = (d for p in doc_paths for d in read_jsonl(p, errors))
    splits = tokenize_docs(docs, tokenizer_path, out_dir, lineage, workers, val_fraction, shard_tokens, batch_docs)
    stats = summarize(splits, errored=len(errors), errors=errors[:100], seconds=round(time.time() - t0, 2),
                      workers=workers)
    with open(os.path.join(out_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    return stats
