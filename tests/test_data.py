import json
import os

import numpy as np
import pytest
import torch

import data
from prep import shards


def make_shards(tmp_path, sizes, vocab=1000):
    """Shards whose token at global offset i is i % vocab: every window is identifiable."""
    offset = 0
    for k, n in enumerate(sizes):
        tokens = (np.arange(offset, offset + n) % vocab).astype(np.uint16)
        shards.write_shard(str(tmp_path / f"train_{k:05d}.bin"), tokens, {"documents": 1, "bytes": n})
        offset += n
    return str(tmp_path / "train_*.bin")


def drain(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_windows_are_inputs_and_shifted_targets(tmp_path):
    loader = data.Loader(make_shards(tmp_path, [100, 57]), seq_len=8, micro_batch=3, shuffle=False)
    assert loader.n_windows == 99 // 8 + 56 // 8
    x, y = loader.next_batch()
    assert x.shape == y.shape == (3, 8) and x.dtype == torch.int64
    assert torch.equal(x[0], torch.arange(8)) and torch.equal(y[0], torch.arange(1, 9))
    assert torch.equal(x[1], torch.arange(8, 16))
    loader.pos = 12  # the first window of the second shard never spans the boundary
    x, _ = loader.next_batch()
    assert torch.equal(x[0], torch.arange(100, 108))


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path):
    pattern = make_shards(tmp_path, [400, 300])
    a = drain(data.Loader(pattern, 8, 4, seed=1), 30)
    b = drain(data.Loader(pattern, 8, 4, seed=1), 30)
    c = drain(data.Loader(pattern, 8, 4, seed=2), 30)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_resume_reads_exactly_the_windows_of_an_uninterrupted_run(tmp_path):
    pattern = make_shards(tmp_path, [400, 300])
    straight = drain(data.Loader(pattern, 8, 4, seed=3), 40)  # crosses an epoch boundary (86 windows)
    first = data.Loader(pattern, 8, 4, seed=3)
    drain(first, 17)
    state = json.loads(json.dumps(first.state_dict()))  # as it travels through a checkpoint
    resumed = data.Loader(pattern, 8, 4, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(straight[17:], drain(resumed, 23)))


def test_data_parallel_ranks_read_disjoint_slices_of_the_global_batch(tmp_path):
    pattern = make_shards(tmp_path, [400, 300])
    single = drain(data.Loader(pattern, 8, 4, seed=5), 10)
    ranks = [drain(data.Loader(pattern, 8, 2, rank=r, world=2, seed=5), 10) for r in range(2)]
    for step in range(10):
        together = torch.cat([ranks[0][step][0], ranks[1][step][0]])
        assert torch.equal(together, single[step][0])
        starts = {int(r[0]) for r in together}
        assert len(starts) == 4


def test_state_from_other_data_is_refused(tmp_path):
    pattern = make_shards(tmp_path, [400])
    state = data.Loader(pattern, 8, 4).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        data.Loader(pattern, 16, 4).load_state_dict(state)


def test_truncated_shard_and_missing_sidecar_are_named(tmp_path):
    pattern = make_shards(tmp_path, [100])
    path = tmp_path / "train_00000.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train_00000.bin.*truncated or corrupt"):
        data.Loader(pattern, 8, 2)
    os.remove(tmp_path / "train_00000.json")
    with pytest.raises(ValueError, match="train_00000.json: unreadable shard sidecar"):
        data.Loader(pattern, 8, 2)
    with pytest.raises(FileNotFoundError, match="data.train: no token shards match"):
        data.Loader(str(tmp_path / "nothing_*.bin"), 8, 2)


def test_token_byte_lengths_count_the_bytes_of_the_text(tokens_dir):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokens_dir / "tokenizer.json"))
    lengths = data.token_byte_lengths(str(tokens_dir / "tokenizer.json"))
    text = "déjà vu: 3.14159 — naïve café 🙂\n\tdef f(): return {'ok': True}\n"
    ids = tok.encode("<|bos|>" + text).ids
    assert ids[0] == tok.token_to_id("<|bos|>") and lengths[ids[0]] == 0
    assert sum(lengths[i] for i in ids) == len(text.encode())


def test_token_byte_lengths_of_a_sentencepiece_style_vocabulary(tmp_path):
    """Llama-2-style: "\u2581" stands for a space, <0xNN> byte-fallback tokens for one byte each of
    characters outside the vocabulary, and a special token past the base vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    pieces = ["<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581"] + list("abcdefghijklmnopqrstuvwxyz.")
    vocab = {p: i for i, p in enumerate(pieces + ["\u2581t", "\u2581th", "\u2581the"])}
    merges = [("\u2581", "t"), ("\u2581t", "h"), ("\u2581th", "e")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<|bos|>"])
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    lengths = data.token_byte_lengths(path)
    assert len(lengths) == len(vocab) + 1 and lengths[tok.token_to_id("<|bos|>")] == 0
    text = "the cat ate the naïve café.\nthe end"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.token_to_id("<0xC3>") in ids  # ï and é went through byte fallback
    assert tok.decode(ids) == text
    # The first token's "\u2581" is the space prepended to the text, which stands for no byte of it.
    assert sum(lengths[i] for i in ids) - 1 == len(text.encode())


def mixture_sources(tmp_path, weights):
    """Two sources whose tokens say where they come from: a's are < 5000, b's are >= 5000."""
    out = {}
    for name, offset in (("a", 0), ("b", 5000)):
        d = tmp_path / name
        d.mkdir()
        for k in range(2):
            tokens = (offset + np.arange(k * 4000, (k + 1) * 4000) % 1000).astype(np.uint16)
            shards.write_shard(str(d / f"train_{k:05d}.bin"), tokens, {"documents": 1, "bytes": 4000})
        out[name] = {"path": str(d / "train_*.bin"), "weight": weights[name]}
    return out


def test_a_mixture_draws_windows_in_proportion_to_the_weights(tmp_path):
    """Over 3,200 windows the share of each source matches its weight (chi-square, one degree
    of freedom, under 3.84: p > 0.05), and two data-parallel ranks read the one-rank batches."""
    sources = mixture_sources(tmp_path, {"a": 0.3, "b": 0.7})
    one = data.Mixture(sources, 16, 8, seed=3)
    batches = [one.next_batch()[0] for _ in range(400)]
    from_b = sum(int((x[:, 0] >= 5000).sum()) for x in batches)
    n = 400 * 8
    chi2 = (from_b - 0.7 * n) ** 2 / (0.7 * n) + ((n - from_b) - 0.3 * n) ** 2 / (0.3 * n)
    assert chi2 < 3.84, (from_b / n, chi2)
    assert one.windows == {"a": n - from_b, "b": from_b}
    ranks = [data.Mixture(sources, 16, 4, rank=r, world=2, seed=3) for r in (0, 1)]
    for x in batches[:5]:
        assert torch.equal(torch.cat([r.next_batch()[0] for r in ranks]), x)


def test_a_mixture_resumes_with_the_same_next_windows(tmp_path):
    sources = mixture_sources(tmp_path, {"a": 1.0, "b": 2.0})
    straight = data.Mixture(sources, 16, 8, seed=0)
    want = [straight.next_batch()[0] for _ in range(700)]  # far enough that source b repeats
    first = data.Mixture(sources, 16, 8, seed=0)
    for _ in range(300):
        first.next_batch()
    resumed = data.Mixture(sources, 16, 8, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # through state.json
    assert all(torch.equal(resumed.next_batch()[0], x) for x in want[300:])
    assert resumed.epochs()["b"] > 1 and straight.epochs() == resumed.epochs()
