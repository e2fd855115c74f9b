"""Dedup against independent references: exact Jaccard from Python sets, a naive scan for
repeated substrings, the LSH candidate probability, and the single-task result."""
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


def test_bloom_filter_has_no_false_negatives_and_bounded_false_positives():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 20_000, dtype=np.uint64)
    stream = np.concatenate([hashes, hashes[:5000]])  # 5000 exact repeats at the end
    root = dedup.bloom_duplicates(stream, capacity=len(hashes), error=0.01)
    assert (root[20_000:] == -1).all()
    false_pos = (root[:20_000] == -1).mean()
    assert false_pos < 0.03  # ~0.01 at capacity


def naive_repeated(texts, L):
    """Mark [p, p + L) when the L characters at p occurred at an earlier position of the
    concatenation, never across a document boundary: the definition, by brute force."""
    seen, masks = set(), []
    for t in texts:
        m = np.zeros(len(t), bool)
        for p in range(len(t) - L + 1):
            s = t[p:p + L]
            if s in seen:
                m[p:p + L] = True
            else:
                seen.add(s)
        masks.append(m)
    return masks


def test_repeated_spans_match_brute_force():
    rng = random.Random(3)
    for L in (5, 8, 13):
        texts = ["".join(rng.choice("ab") for _ in range(rng.randrange(0, 60))) for _ in range(6)]
        got = dedup.repeated_spans(texts, L)
        for g, want in zip(got, naive_repeated(texts, L)):
            assert g.tolist() == want.tolist()


def test_substring_dedup_removes_a_planted_span():
    rng = random.Random(4)
    span = " ".join(words(60, rng))  # ~300 characters
    short = " ".join(words(20, rng))  # ~100 characters: under the 200-character threshold
    a = " ".join(words(100, rng)) + " " + span + " " + short + " end"
    b = " ".join(words(100, rng)) + " " + short + " mid " + span + " tail é"
    masks = dedup.repeated_spans([a, b])
    assert not masks[0].any()  # the first occurrence stays
    start = b.index(span) - 1  # " " + span + " " occurs in both
    end = start + len(span) + 2
    assert masks[1][start:end].all() and masks[1].sum() == end - start
    assert dedup.remove_spans(b, masks[1]) == b[:start] + b[end:]
