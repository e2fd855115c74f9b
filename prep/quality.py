"""Model-based quality: a fastText-style linear classifier trained here, and an n-gram
language model for perplexity filtering (the CCNet idea, Wenzek et al. 2020).

Both are trained on reference text (Wikipedia-like prose: the positive class / the LM's
training text) and applied as steps; both write their score into the document's meta so
inspection can show what was kept and removed at each score.
"""
import functools
import gzip
import json
import math
import re
import zlib
from collections import Counter

import numpy as np

TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def tokens_of(text):
    return TOKEN.findall(text.lower())


# --- classifier --------------------------------------------------------------------------

# fastText (Joulin et al. 2017): hashed word uni+bigrams into 2M buckets; a linear model on
# their average. We keep 2^20 buckets (a 4 MB weight file) and one output: P(reference).
CLASSIFIER_BUCKETS = 1 << 20
CLASSIFIER_NGRAMS = 2
# GPT-3 (Brown et al. 2020, appendix A): keep a document when pareto(alpha=9) > 1 - score,
# so mostly high scores but some low-scoring text too (diversity).
PARETO_ALPHA = 9.0


def features(text, buckets=CLASSIFIER_BUCKETS, ngrams=CLASSIFIER_NGRAMS):
    """Bucket indices of the word n-grams (n = 1..ngrams) of text, with repeats."""
    words = tokens_of(text)
    grams = [" ".join(words[i:i + n]) for n in range(1, ngrams + 1) for i in range(len(words) - n + 1)]
    return np.array([zlib.crc32(g.encode()) % buckets for g in grams], dtype=np.int64)


def train_classifier(positive, negative, buckets=CLASSIFIER_BUCKETS, ngrams=CLASSIFIER_NGRAMS, epochs=5, lr=0.5,
                     seed=0):
    """Logistic regression by SGD on the mean of hashed n-gram weights. Every n-gram of the document takes the
    full gradient step, not 1/n of it (the mean's own gradient): with a single output dimension the 1/n steps
    leave long documents' weights almost unmoved. Returns the model dict."""
    data = [(features(t, buckets, ngrams), 1.0) for t in positive] + [(features(t, buckets, ngrams), 0.0)
                                                                       for t in negative]
    w, b = np.zeros(buckets, np.float32), 0.0
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        step = lr * (1 - epoch / epochs)  # linear decay, as fastText
        for i in rng.permutation(len(data)):
            idx, y = data[i]
            if idx.size == 0:
                continue
            p = 1 / (1 + math.exp(-(b + w[idx].mean())))
            g = step * (p - y)
            np.add.at(w, idx, -g)
            b -= g
    return {"w": w, "b": np.float32(b), "buckets": buckets, "ngrams": ngrams}


def save_classifier(model, path):
    np.savez_compressed(path, **model)


@functools.lru_cache(maxsize=4)
def load_classifier(path):
    with np.load(path) as z:
        return {"w": z["w"], "b": float(z["b"]), "buckets": int(z["buckets"]), "ngrams": int(z["ngrams"])}


def classifier_score(model, text):
    idx = features(text, model["buckets"], model["ngrams"])
    z = model["b"] + (float(model["w"][idx].mean()) if idx.size else 0.0)
    return 1 / (1 + math.exp(-z))


def classifier(doc, model, threshold=0.5, selection="threshold", pareto_alpha=PARETO_ALPHA, seed=0):
    """Step: score P(reference-like) into meta["quality_score"]; keep by a hard threshold, or
    (selection = "sample") stochastically, GPT-3's way, seeded by the document id."""
    score = classifier_score(load_classifier(model), doc["text"])
    doc["meta"]["quality_score"] = round(score, 4)
    if selection == "threshold":
        return None if score >= threshold else "low_score"
    if selection == "sample":
        rng = np.random.default_rng(zlib.crc32(f"{seed}:{doc['id']}".encode()))
        return None if rng.pareto(pareto_alpha) > 1 - score else "not_sampled"
    raise ValueError(f"classifier: selection must be 'threshold' or 'sample', not {selection!r}")


# --- n-gram language model ---------------------------------------------------------------

# Interpolated Kneser-Ney (Chen and Goodman 1999) with the usual single discount 0.75.
KN_ORDER, KN_DISCOUNT = 3, 0.75
# CCNet (Wenzek et al. 2020, sec. 3.3) cuts perplexity at the 33rd and 66th percentiles into head/middle/tail buckets.
PERPLEXITY_PERCENTILES = (33, 66)
BOS_TOKEN, EOS_TOKEN = "<s>", "</s>"


class KneserNey:
    """P(w | h) = max(c(h w) - D, 0) / c(h) + D N(h .) / c(h) P(w | h minus its first word), from the unigram
    level (over the vocabulary plus one unknown word, uniform below it) up. The highest order counts n-grams; lower
    orders count *continuations*: in how many distinct contexts a k-gram appears. So each level sums to 1."""

    def __init__(self, counts, order, discount=KN_DISCOUNT):
        self.order, self.discount, self.counts = order, discount, counts  # counts[k][k-gram tuple]
        self.context = [None] + [{} for _ in range(order)]  # context[k][h] = [c(h), N(h .)]
        for k in range(1, order + 1):
            for gram, c in counts[k].items():
                total = self.context[k].setdefault(gram[:-1], [0, 0])
                total[0] += c
                total[1] += 1
        self.vocab_size = len(counts[1])

    @classmethod
    def train(cls, texts, order=KN_ORDER, discount=KN_DISCOUNT):
        top = Counter()
        for text in texts:
            for line in text.split("\n"):
                toks = [BOS_TOKEN] * (order - 1) + tokens_of(line) + [EOS_TOKEN]
                if len(toks) > order:
                    top.update(zip(*(toks[i:] for i in range(order))))
        counts = {order: top}
        for k in range(order - 1, 0, -1):  # continuation counts N(. w_2..w_k+1), from distinct (k+1)-grams
            counts[k] = Counter(gram[1:] for gram in counts[k + 1])
        return cls(counts, order, discount)

    def prob(self, history, w):
        p = 1.0 / (self.vocab_size + 1)
        for k in range(1, self.order + 1):
            h = tuple(history[len(history) - k + 1:]) if k > 1 else ()
            total, types = self.context[k].get(h, (0, 0))
            if total:
                p = max(self.counts[k].get(h + (w,), 0) - self.discount, 0) / total + \
                    self.discount * types / total * p
        return p

    def log_prob(self, text):
        """(sum of natural-log probabilities, number of predicted tokens) over text's lines."""
        total, n = 0.0, 0
        for line in text.split("\n"):
            toks = tokens_of(line)
            if not toks:
                continue
            toks = [BOS_TOKEN] * (self.order - 1) + toks + [EOS_TOKEN]
            for i in range(self.order - 1, len(toks)):
                total += math.log(self.prob(toks[i - self.order + 1:i], toks[i]))
                n += 1
        return total, n

    def perplexity(self, text):
        total, n = self.log_prob(text)
        return math.exp(-total / n) if n else float("inf")

    def save(self, path, cutoffs=None):
        spec = {"order": self.order, "discount": self.discount, "cutoffs": cutoffs,
                "counts": {k: [["\x1f".join(g), c] for g, c in self.counts[k].items()] for k in self.counts}}
        with gzip.open(path, "wt", encoding="utf-8") as f:
            json.dump(spec, f)


@functools.lru_cache(maxsize=4)
def load_lm(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        spec = json.load(f)
    counts = {int(k): {tuple(g.split("\x1f")): c for g, c in v} for k, v in spec["counts"].items()}
    return KneserNey(counts, spec["order"], spec["discount"]), spec["cutoffs"]


def perplexity(doc, model, max_perplexity=None, keep_buckets=None, cutoffs=None):
    """Step: score perplexity into meta; keep by threshold (max_perplexity) or by CCNet
    bucket (keep_buckets, e.g. ["head", "middle"], with the model's or given cutoffs)."""
    lm, model_cutoffs = load_lm(model)
    ppl = lm.perplexity(doc["text"])
    lo, hi = cutoffs or model_cutoffs or (float("inf"), float("inf"))
    bucket = "head" if ppl <= lo else "middle" if ppl <= hi else "tail"
    doc["meta"]["perplexity"], doc["meta"]["perplexity_bucket"] = round(ppl, 1), bucket
    if max_perplexity is not None and ppl > max_perplexity:
        return "high_perplexity"
    if keep_buckets is not None and bucket not in keep_buckets:
        return f"bucket_{bucket}"
    return None
