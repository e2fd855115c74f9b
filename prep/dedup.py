"""Deduplication: exact (hash of normalised text) and MinHash LSH near-duplicates in stages.

Documents are named by their global number g = (documents in earlier tasks) + index in task, so every stage's result
is independent of how many workers ran it. In a cluster of duplicates the document with the smallest number is kept.
"""
import hashlib
import zlib

import numpy as np

from prep.filters import normalize_for_hash

# FineWeb (Penedo et al. 2024, sec. 3.4): 5-gram word shingles, 112 hashes in 14 bands of 8. A pair with Jaccard
# similarity s is a candidate with probability 1 - (1 - s^8)^14: 0.92 at s = 0.8, 0.9996 at s = 0.9, 0.00004 at s = 0.3.
MINHASH_NGRAM, MINHASH_BANDS, MINHASH_ROWS = 5, 14, 8
EMPTY = 0xFFFFFFFF  # the signature of a text without words: ignored by the band stage
_ROLL = np.uint64(1099511628211)  # FNV prime, the multiplier that mixes word hashes into a shingle hash


def text_hash(text):
    return int.from_bytes(hashlib.blake2b(normalize_for_hash(text).encode(), digest_size=8).digest(), "little")


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
