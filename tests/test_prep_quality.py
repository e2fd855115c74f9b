"""The quality classifier and the Kneser-Ney LM, checked against closed forms."""
import math
import random

import numpy as np
import pytest

from prep import quality


def sample_docs(vocab, n_docs, rng, length=60):
    return [" ".join(rng.choice(vocab) for _ in range(length)) for _ in range(n_docs)]


def test_classifier_separates_two_distributions(tmp_path):
    rng = random.Random(0)
    shared = [f"common{i}" for i in range(200)]
    good = shared + [f"good{i}" for i in range(100)]  # same shared words, different markers
    bad = shared + [f"bad{i}" for i in range(100)]
    pos, neg = sample_docs(good, 400, rng), sample_docs(bad, 400, rng)
    model = quality.train_classifier(pos[:300], neg[:300], buckets=1 << 16, epochs=3)
    quality.save_classifier(model, str(tmp_path / "m.npz"))
    loaded = quality.load_classifier(str(tmp_path / "m.npz"))
    acc = (sum(quality.classifier_score(loaded, t) > 0.5 for t in pos[300:])
           + sum(quality.classifier_score(loaded, t) < 0.5 for t in neg[300:])) / 200
    assert acc > 0.97
    d = {"id": "x", "text": pos[300], "meta": {}}
    assert quality.classifier(d, str(tmp_path / "m.npz"), threshold=0.5) is None and d["meta"]["quality_score"] > 0.5


def test_stochastic_selection_keeps_at_the_pareto_rate(tmp_path):
    # A model that scores every document s: GPT-3's rule keeps when pareto(9) > 1 - s, and
    # numpy's pareto is Lomax, P(X > t) = (1 + t)^-9, so the keep rate is (2 - s)^-9.
    for s in (0.3, 0.8):
        path = str(tmp_path / f"const{s}.npz")
        quality.save_classifier({"w": np.zeros(16, np.float32), "b": np.float32(math.log(s / (1 - s))),
                                 "buckets": 16, "ngrams": 1}, path)
        n = 4000
        kept = sum(quality.classifier({"id": i, "text": "any text", "meta": {}}, path, selection="sample") is None
                   for i in range(n))
        p = (2 - s) ** -quality.PARETO_ALPHA
        assert abs(kept / n - p) < 4 * math.sqrt(p * (1 - p) / n), (s, kept / n, p)


@pytest.fixture(scope="module")
def lm():
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(50)]
    texts = [" ".join(vocab[(j * 7 + rng.randrange(3)) % 50] for j in range(40)) for _ in range(60)]
    return quality.KneserNey.train(texts), texts


def test_kneser_ney_distributions_sum_to_one(lm):
    model, _ = lm
    vocab = [w[0] for w in model.counts[1]] + ["<never-seen>"]
    for history in [(), ("w7",), ("w7", "w14"), ("w3", "w1"), ("<s>", "<s>"), ("zz", "w7")]:
        total = sum(model.prob(history, w) for w in vocab[:-1])
        total += model.prob(history, vocab[-1])  # the one unknown-word slot
        assert total == pytest.approx(1.0, abs=1e-9), history


def test_perplexity_ranks_in_domain_text_lower_and_survives_save(lm, tmp_path):
    model, texts = lm
    rng = random.Random(2)
    scrambled = " ".join(rng.sample(texts[0].split(), len(texts[0].split())))
    assert model.perplexity(texts[0]) < model.perplexity(scrambled) < model.perplexity("qq rr ss tt uu vv")
    model.save(str(tmp_path / "lm.json.gz"), cutoffs=[5.0, 50.0])
    loaded, cutoffs = quality.load_lm(str(tmp_path / "lm.json.gz"))
    assert loaded.perplexity(scrambled) == pytest.approx(model.perplexity(scrambled)) and cutoffs == [5.0, 50.0]
    path = str(tmp_path / "lm.json.gz")
    d = {"id": 1, "text": texts[0], "meta": {}}
    assert quality.perplexity(d, path, keep_buckets=["head"]) is None and d["meta"]["perplexity_bucket"] == "head"
    d = {"id": 2, "text": "qq rr ss tt uu vv", "meta": {}}
    assert quality.perplexity(d, path, keep_buckets=["head", "middle"]) == "bucket_tail"
    assert quality.perplexity(d, path, max_perplexity=d["meta"]["perplexity"] - 1) == "high_perplexity"
