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
    from config import config_from_dict

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
        return config_from_dict(d)
    return make


# ----------------------------------------------------------------------------------------
# Multi-process helpers: gloo process groups on the CPU.

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close_process_groups():
    """Free the model's reference cycles (hooks, partials) that keep gloo groups alive, then
    destroy the groups, while the interpreter is whole: gloo work objects freed during
    interpreter shutdown abort the process ("terminate called without an active exception")."""
    import gc

    import torch.distributed as dist
    gc.collect()
    dist.destroy_process_group()


def _worker(rank, world, port, fn, args, result_path):
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(*args)
        if rank == 0:
            torch.save(result, result_path)
        del result
        dist.barrier()  # no rank tears the group down while a peer still talks to it
    finally:
        close_process_groups()


def spawn(world, fn, *args):
    """fn(*args) on `world` fresh processes joined in a gloo group; rank 0's return value."""
    import tempfile

    import torch
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "result.pt")
        mp.start_processes(_worker, args=(world, free_port(), fn, args, path), nprocs=world, start_method="spawn")
        return torch.load(path, weights_only=False)


def train_command(config_path, nproc, *extra):
    """The command line that trains config_path on nproc processes (torchrun when > 1)."""
    import sys
    if nproc == 1:
        return [sys.executable, "train.py", "--config", str(config_path), *extra]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(free_port()), "train.py", "--config", str(config_path), *extra]


# ----------------------------------------------------------------------------------------
# Generation reference: recompute the whole text for every new token, no cache.

def rows_alone(model, prompts, steps):
    """The greedy tokens and last-position logits of each prompt, recomputing the whole
    sequence for every new token without a cache: the reference for the cache and batching."""
    out = []
    for p in prompts:
        seq, logits = list(p), []
        with torch.no_grad():
            for _ in range(steps):
                logits.append(model(torch.tensor([seq]))[0, -1])
                seq.append(int(logits[-1].argmax()))
        out.append((seq[len(p):], torch.stack(logits)))
    return out


def check_cached_decoding(model, ref, prompts, steps):
    """Left-padded prompts of several lengths in one batch: prefill, then one cached step at a
    time; every row's logits at every step equal ref recomputing its text alone. Returns the
    reference's (tokens, logits) per prompt."""
    import infer
    expected = rows_alone(ref, prompts, steps)
    S = max(map(len, prompts))
    ids = torch.tensor([[0] * (S - len(p)) + p for p in prompts])
    starts = torch.tensor([S - len(p) for p in prompts])
    infer.setup_caches(model, len(prompts), S + steps)
    try:
        with torch.no_grad():
            logits = infer.prefill(model, ids, starts)
            for i in range(steps):
                for b, (tokens, want) in enumerate(expected):
                    torch.testing.assert_close(logits[b], want[i], atol=1e-4, rtol=1e-4)
                token = torch.tensor([[tokens[i]] for tokens, _ in expected])
                logits = infer.decode_one_token(model, token, torch.tensor([S + i]), starts)
    finally:
        infer.clear_caches(model)
    return expected
