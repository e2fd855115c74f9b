import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Triton kernels run through the interpreter on a CPU machine; the flag must be set
# before triton is first imported.
try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

import pytest  # noqa: E402

SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


@pytest.fixture(scope="session")
def tokens_dir(tmp_path_factory):
    """A small real corpus (the json and email packages of the standard library, ~0.5 MB),
    a 512-token BPE tokenizer and train/val shards, built once per test session."""
    from prep import readers, shards, tokenizer
    d = tmp_path_factory.mktemp("tokens")
    docs = [doc for pkg in ("json", "email") for doc in readers.read_tree(
        os.path.join(readers.stdlib_root(), pkg), (".py",))]
    readers.write_jsonl(docs, str(d / "docs.jsonl"))
    tok = tokenizer.train_tokenizer((doc["text"] for doc in docs), 512)
    tok.save(str(d / "tokenizer.json"))
    shards.tokenize_to_shards([str(d / "docs.jsonl")], str(d / "tokenizer.json"), str(d / "out"), workers=1,
                              val_fraction=0.15, shard_tokens=20_000)
    return d / "out"


@pytest.fixture
def tiny_config(tokens_dir, tmp_path):
    """A Config for a ~100k-parameter model on the session's shards, with overrides."""
    import train

    def make(**sections):
        d = {"model": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64),
             "data": dict(train=str(tokens_dir / "train_*.bin"), val=str(tokens_dir / "val_*.bin"), seq_len=32,
                          micro_batch=4, seed=0),
             "optim": dict(lr=3e-3, min_lr=3e-4, warmup=5, steps=20),
             "log": dict(dir=str(tmp_path / "run"), every=1),
             "eval": dict(val_every=0, val_batches=2),
             "checkpoint": dict(every=0, keep=5)}
        for name, values in sections.items():
            d.setdefault(name, {}).update(values)
        return train.config_from_dict(d)
    return make
