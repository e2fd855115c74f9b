"""Dedup against independent references: exact Jaccard from Python sets, a naive scan for
the LSH candidate probability, and the single-task result."""
import random

import numpy as np

from prep import dedup


def words(n, rng, vocab=5000):
    """Random words of letters (dedup normalises every digit to 0, so w1 and w2 would be equal)."""
    return ["".join("abcdefghijklmnopqrstuvwxyz"[int(c)] for c in f"{rng.randrange(vocab):04d}") + "q"
            for _ in range(n)]


def ref_jaccard(a, b, n=5):
    """Word 5-gram Jaccard straight from the definition (texts here are lowercase words)."""
    ga = {tuple(a.split()[i:i + n]) for i in range(len(a.split()) - n + 1)}
    gb = {tuple(b.split()[i:i + n]) for i in range(len(b.split()) - n + 1)}
    return len(ga & gb) / len(ga | gb)


def near_copy(ws, n_changes, rng):
    out = list(ws)
    for i in rng.sample(range(len(ws)), n_changes):
        out[i] = "".join(rng.choice("xyz") for _ in range(12))
    return out


def lsh_clusters(texts, params=None):
    params = params or dedup.minhash_params()
    sigs = np.array([dedup.minhash_signature(t, params) for t in texts])
    edges = np.concatenate([dedup.band_edges(sigs, b) for b in range(dedup.MINHASH_BANDS)])
    return dedup.clusters(len(texts), edges), sigs


def test_minhash_flags_similar_pairs_and_not_distinct_documents():
    rng = random.Random(0)
    texts, pairs = [], []
    for _ in range(30):  # near-duplicate pairs with Jaccard >= 0.8
        ws = words(300, rng)
        copy = near_copy(ws, 4, rng)
        assert ref_jaccard(" ".join(ws), " ".join(copy)) >= 0.8
        pairs.append((len(texts), len(texts) + 1))
        texts += [" ".join(ws), " ".join(copy)]
    distinct = len(texts)
    texts += [" ".join(words(300, rng)) for _ in range(60)]  # unrelated documents
    root, _ = lsh_clusters(texts)
    assert all(root[b] == a for a, b in pairs)  # the later of each pair points at the earlier
    assert (root[distinct:] == np.arange(distinct, len(texts))).all()
    assert len(set(root.tolist())) == len(pairs) + len(texts) - distinct


def test_minhash_signature_agreement_estimates_jaccard():
    # The fraction of equal signature entries is an unbiased estimate of Jaccard, with
    # standard deviation sqrt(J (1 - J) / 112).
    rng = random.Random(1)
    params = dedup.minhash_params()
    for changes in (2, 10, 30, 80):
        ws = words(400, rng)
        a, b = " ".join(ws), " ".join(near_copy(ws, changes, rng))
        j = ref_jaccard(a, b)
        est = (dedup.minhash_signature(a, params) == dedup.minhash_signature(b, params)).mean()
        assert abs(est - j) <= 4 * np.sqrt(j * (1 - j) / 112) + 1e-9, (changes, j, est)


def test_minhash_candidate_rate_matches_banding_formula():
    # Over many pairs of similarity s, the fraction that share a band is 1 - (1 - s^8)^14.
    rng = random.Random(2)
    hits, trials, js = 0, 150, []
    for seed in range(trials):
        ws = words(200, rng)
        a, b = " ".join(ws), " ".join(near_copy(ws, 12, rng))
        js.append(ref_jaccard(a, b))
        root, _ = lsh_clusters([a, b], dedup.minhash_params(seed=seed))
        hits += root[1] == 0
    expected = np.mean([1 - (1 - j ** 8) ** 14 for j in js])
    assert abs(hits / trials - expected) < 4 * np.sqrt(expected * (1 - expected) / trials) + 0.02


def test_exact_duplicates_normalise_and_keep_first():
    texts = ["Hello, World! 2024", "something else", "hello world 1999", "HELLO   world\n0000", "else something"]
    root = dedup.exact_duplicates(np.array([dedup.text_hash(t) for t in texts], dtype=np.uint64))
    assert root.tolist() == [0, 1, 0, 0, 4]  # digits normalise to 0, case and punctuation go
