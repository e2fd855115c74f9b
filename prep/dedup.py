"""Deduplication: exact (hash of normalised text, or a Bloom filter), MinHash LSH near-
duplicates in stages, and exact-substring removal with a suffix array.

Documents are named by their global number g = (documents in earlier tasks) + index in
task, so every stage's result is independent of how many workers ran it. In a cluster of
duplicates the document with the smallest number is kept.
"""
import hashlib
import math
import zlib

import numpy as np

from prep.filters import normalize_for_hash

# FineWeb (Penedo et al. 2024, sec. 3.4): 5-gram word shingles, 112 hashes in 14 bands of 8.
# A pair with Jaccard similarity s becomes a candidate with probability 1 - (1 - s^8)^14:
# 0.92 at s = 0.8, 0.9996 at s = 0.9, 0.00004 at s = 0.3.
MINHASH_NGRAM, MINHASH_BANDS, MINHASH_ROWS = 5, 14, 8
EMPTY = 0xFFFFFFFF  # the signature of a text without words: ignored by the band stage
_ROLL = np.uint64(1099511628211)  # FNV prime, the multiplier that mixes word hashes into a shingle hash


def hash64(data):
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def text_hash(text):
    return hash64(normalize_for_hash(text).encode())


# --- MinHash -----------------------------------------------------------------------------

def minhash_params(n_hashes=MINHASH_BANDS * MINHASH_ROWS, seed=1):
    """(a, b) of n multiply-shift hash functions h(x) = ((a x + b) mod 2^64) >> 32 with a odd
    (Dietzfelbinger 1996): universal for 32-bit x, and no modulo in the inner loop."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, n_hashes, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    return a[:, None], rng.integers(0, 2**63, n_hashes, dtype=np.uint64)[:, None]


def shingles(text, n=MINHASH_NGRAM):
    """Distinct 32-bit hashes of the word n-grams of the normalised text (one shingle for
    a text shorter than n words, none for an empty one)."""
    words = normalize_for_hash(text).split()
    if not words:
        return np.zeros(0, np.uint64)
    h = np.array([zlib.crc32(w.encode()) for w in words], dtype=np.uint64)
    m = max(1, len(h) - n + 1)
    s = np.zeros(m, np.uint64)
    for j in range(min(n, len(h))):  # s = h[i] R^(n-1) + ... + h[i+n-1], wrapping mod 2^64
        s = s * _ROLL + h[j:j + m]
    return np.unique((s >> np.uint64(32)) ^ (s & np.uint64(0xFFFFFFFF)))


def minhash_signature(text, params, n=MINHASH_NGRAM, chunk=4096):
    """min over shingles of each hash function: (n_hashes,) uint32. A text without words
    gets the all-EMPTY signature, which the band stage ignores."""
    a, b = params
    sig = np.full(a.shape[0], EMPTY, np.uint64)
    s = shingles(text, n)
    for i in range(0, s.size, chunk):
        sig = np.minimum(sig, ((a * s[None, i:i + chunk] + b) >> np.uint64(32)).min(axis=1))
    return sig.astype(np.uint32)


def band_edges(signatures, band, rows=MINHASH_ROWS):
    """Stage 2, one band: signatures (n, n_hashes) of all documents in global order ->
    edges (k, 2) int64 linking each document to the first one with the same band."""
    cols = signatures[:, band * rows:(band + 1) * rows]
    valid = np.flatnonzero(~(cols == EMPTY).all(axis=1))
    cols = cols[valid]
    order = np.lexsort(cols.T[::-1])  # sort rows lexicographically; ties keep global order
    sorted_cols = cols[order]
    new_group = np.ones(len(order), bool)
    new_group[1:] = (sorted_cols[1:] != sorted_cols[:-1]).any(axis=1)
    first = np.maximum.accumulate(np.where(new_group, np.arange(len(order)), 0))
    dup = ~new_group
    return np.stack([valid[order[first[dup]]], valid[order[dup]]], axis=1).astype(np.int64)


def clusters(n_docs, edges):
    """Stage 3: union-find over edges -> root[g], the smallest document number of g's cluster."""
    parent = np.arange(n_docs)

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for u, v in edges:
        ru, rv = find(u), find(v)
        if ru != rv:
            parent[max(ru, rv)] = min(ru, rv)
    return np.array([find(x) for x in range(n_docs)], dtype=np.int64)


def cluster_report(root, ids, n_samples=5):
    """Size distribution of duplicate clusters and the largest few (kept id, removed ids)."""
    sizes = np.bincount(root, minlength=len(root))
    multi = np.flatnonzero(sizes > 1)
    hist = {int(s): int(c) for s, c in zip(*np.unique(sizes[multi], return_counts=True))}
    largest = multi[np.argsort(-sizes[multi], kind="stable")][:n_samples]
    samples = [{"kept": ids[r], "size": int(sizes[r]),
                "removed": [ids[g] for g in np.flatnonzero(root == r)[1:6]]} for r in largest]
    return {"clusters": len(multi), "documents_in_clusters": int(sizes[multi].sum()),
            "cluster_sizes": hist, "largest_clusters": samples}


# --- exact dedup -------------------------------------------------------------------------

def exact_duplicates(hashes):
    """root[g] = first document with the same hash (global order)."""
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    return first[inverse.ravel()].astype(np.int64)


class BloomFilter:
    """A set of 64-bit hashes in m bits with k probes (double hashing, Kirsch and
    Mitzenmacher 2006): constant memory, false positives at rate ~error, no false negatives."""

    def __init__(self, capacity, error=0.001):
        self.m = max(64, int(-capacity * math.log(error) / math.log(2) ** 2))
        self.k = max(1, round(self.m / capacity * math.log(2)))
        self.bits = np.zeros((self.m + 7) // 8, np.uint8)

    def add(self, h):
        """Insert h; True when it was (probably) there already."""
        h1, h2 = h & 0xFFFFFFFF, (h >> 32) | 1
        pos = [(h1 + i * h2) % self.m for i in range(self.k)]
        present = all(self.bits[p >> 3] >> (p & 7) & 1 for p in pos)
        for p in pos:
            self.bits[p >> 3] |= 1 << (p & 7)
        return present


def bloom_duplicates(hashes, capacity=None, error=0.001):
    """root[g] = g for documents seen first, -1 for (probable) repeats: a one-pass stream."""
    bloom = BloomFilter(capacity or max(1, len(hashes)), error)
    return np.array([-1 if bloom.add(int(h)) else g for g, h in enumerate(hashes)], dtype=np.int64)


# --- exact substrings (Lee et al. 2022, "Deduplicating training data makes LMs better") ---

# Lee et al. remove repeated spans of at least 50 BPE tokens; at ~4 characters a token, 200.
SUBSTRING_MIN_CHARS = 200


def prefix_ranks(x, depth):
    """Rank of every suffix of x by its first `depth` symbols (depth a power of two), by
    prefix doubling: ranks for length 2k are the sorted pairs (rank_k[i], rank_k[i + k])."""
    rank = np.unique(x, return_inverse=True)[1].ravel().astype(np.int64)
    k = 1
    while k < depth:
        second = np.full(len(x), -1, np.int64)
        second[:-k] = rank[k:]
        order = np.lexsort((second, rank))
        change = np.ones(len(x), np.int64)
        change[0] = 0
        change[1:] = (rank[order][1:] != rank[order][:-1]) | (second[order][1:] != second[order][:-1])
        rank = np.empty(len(x), np.int64)
        rank[order] = np.cumsum(change)
        k *= 2
    return rank


def repeated_spans(texts, min_chars=SUBSTRING_MIN_CHARS):
    """For each text, a boolean mask of the characters inside a span of >= min_chars that
    already occurred earlier (in this text or an earlier one). The first occurrence stays.

    The texts are concatenated with a distinct separator after each (so no match crosses
    a document), suffixes are sorted to depth min_chars — the suffix array cut at the depth
    we need — and every group of equal prefixes except its leftmost start is marked."""
    parts, sep = [], 0x110000  # above every code point
    for i, t in enumerate(texts):
        parts += [np.frombuffer(t.encode("utf-32-le"), np.uint32).astype(np.int64), np.array([sep + i])]
    x = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    n = len(x)
    if n <= min_chars:
        return [np.zeros(len(t), bool) for t in texts]
    k = 1 << int(math.log2(min_chars))
    rank = prefix_ranks(x, k)
    starts = np.arange(n - min_chars + 1)  # equal (rank_k[i], rank_k[i + L - k]) <=> equal L-prefix
    first, second = rank[starts], rank[starts + min_chars - k]
    order = np.lexsort((starts, second, first))
    same = (first[order][1:] == first[order][:-1]) & (second[order][1:] == second[order][:-1])
    later = order[1:][same]  # not the leftmost of its group (ties are sorted by position)
    cover = np.zeros(n + 1, np.int64)
    np.add.at(cover, later, 1)
    np.add.at(cover, later + min_chars, -1)
    mask = np.cumsum(cover[:n]) > 0
    out, pos = [], 0
    for t in texts:
        out.append(mask[pos:pos + len(t)])
        pos += len(t) + 1
    return out


def remove_spans(text, mask):
    if not mask.any():
        return text
    cps = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    return cps[~mask].tobytes().decode("utf-32-le")
