"""Benchmark of prep/: documents/s and MB/s per worker for each filter and for MinHash,
the pipeline's scaling from 1 to 2 workers, and — where datatrove is installed (a
bench-only reference: pip install datatrove spacy) — the same documents through
datatrove's Gopher, C4, FineWeb and MinHash steps: its time over ours, and the fraction
of documents on which the two make the same keep/remove decision.

    python bench/prep.py [--docs N]

Corpus: the real web text in ../shared/data (C4, CCNet, Wikipedia articles) plus planted
near-duplicates (a few words changed) so MinHash has work; without ../shared/data, the
standard library's .py files.
"""
import argparse
import copy
import os
import random
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prep import dedup, filters, pipeline, readers  # noqa: E402
from prep.recipe import validate  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def corpus(n_docs, seed=0):
    rng = random.Random(seed)
    cc, docs = os.path.join(SHARED, "common_crawl"), []
    if os.path.isdir(cc):
        for name in ("c4_demo.jsonl", "ccnet_cc_en_head-0091.jsonl", "ccnet_cc_en_head-0174.jsonl"):
            docs += [d["text"] for d in readers.read_jsonl(os.path.join(cc, name))]
        with open(os.path.join(SHARED, "text", "wiki_demo.txt"), encoding="utf-8") as f:
            docs += [line.strip() for line in f if line.strip()]
        with open(os.path.join(SHARED, "text", "kjv_bible.txt"), encoding="utf-8") as f:
            lines = [line.rstrip() for line in f]
        docs += ["\n".join(lines[i:i + 30]) for i in range(0, len(lines), 30)]  # 30-line passages
        docs = rng.sample(docs, len(docs))
        code = [d["text"] for d in readers.read_tree(os.path.join(readers.stdlib_root(), "email"), (".py",))]
        docs = code + docs  # some text the web filters should reject
        source = "../shared/data (C4, CCNet, Wikipedia, KJV passages) + stdlib email/*.py"
    else:
        docs = [d["text"] for d in readers.read_tree(readers.stdlib_root(), (".py",))]
        source = "the standard library's .py files"
    docs = docs[:int(n_docs * 0.9)]
    for text in rng.sample(docs, len(docs) // 9):  # ~10% near-duplicates
        words = text.split(" ")
        for i in rng.sample(range(len(words)), max(1, len(words) // 100)):
            words[i] = "edited"
        docs.append(" ".join(words))
    return [{"id": f"d{i}", "text": t, "meta": {}} for i, t in enumerate(docs)], source


def timed(fn, docs):
    docs = copy.deepcopy(docs)  # some steps rewrite the text
    t0 = time.perf_counter()
    decisions = [fn(d) for d in docs]
    return time.perf_counter() - t0, [not isinstance(r, str) for r in decisions]


OURS = {"gopher_repetition": filters.gopher_repetition, "gopher_quality": filters.gopher_quality,
        "c4": lambda d: filters.c4(d, terminal_punctuation=False), "fineweb": filters.fineweb,
        "pii": filters.pii, "tag": filters.tag}


def datatrove_filters():
    try:
        from datatrove.data import Document
        from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                                GopherRepetitionFilter)
    except ImportError:
        return None, None
    steps = {"gopher_repetition": GopherRepetitionFilter(), "gopher_quality": GopherQualityFilter(),
             "c4": C4QualityFilter(filter_no_terminal_punct=False), "fineweb": FineWebQualityFilter()}

    def run(name, docs):
        f = steps[name]
        dt_docs = [Document(text=d["text"], id=d["id"]) for d in docs]
        f.filter(Document(text="warm up the word tokenizer.", id="w"))
        t0 = time.perf_counter()
        out = [f.filter(d) for d in dt_docs]
        return time.perf_counter() - t0, [r is True or (isinstance(r, tuple) and r[0]) for r in out]
    return steps, run


def our_minhash(docs):
    t0 = time.perf_counter()
    params = dedup.minhash_params()
    sigs = np.array([dedup.minhash_signature(d["text"], params) for d in docs])
    t1 = time.perf_counter()
    edges = np.concatenate([dedup.band_edges(sigs, b) for b in range(dedup.MINHASH_BANDS)])
    root = dedup.clusters(len(docs), edges)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, {docs[i]["id"] for i in range(len(docs)) if root[i] != i}


def datatrove_minhash(docs, tmp):
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers.jsonl import JsonlWriter
    os.makedirs(os.path.join(tmp, "in"))
    readers.write_jsonl(docs, os.path.join(tmp, "in", "docs.jsonl"))
    from datatrove.utils.hashing import HashConfig
    # sha1 shingle hashes: datatrove's xxhash path passes str where recent xxhash wants bytes
    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(hash_fc="sha1"))
    d = lambda name: os.path.join(tmp, name)  # noqa: E731
    reader = lambda: JsonlReader(d("in"), glob_pattern="*.jsonl")  # noqa: E731
    stages = [
        ([reader(), MinhashDedupSignature(output_folder=d("sigs"), config=cfg)], 1),
        ([MinhashDedupBuckets(input_folder=d("sigs"), output_folder=d("buckets"), config=cfg)], cfg.num_buckets),
        ([MinhashDedupCluster(input_folder=d("buckets"), output_folder=d("remove"), config=cfg)], 1),
        ([reader(), MinhashDedupFilter(input_folder=d("remove"), exclusion_writer=JsonlWriter(d("removed"))),
          JsonlWriter(d("kept"))], 1)]
    times = []
    for i, (steps, tasks) in enumerate(stages):
        t0 = time.perf_counter()
        LocalPipelineExecutor(pipeline=steps, tasks=tasks, workers=1, logging_dir=d(f"logs{i}")).run()
        times.append(time.perf_counter() - t0)
    removed = set()
    for name in os.listdir(d("removed")):
        removed |= {doc["id"] for doc in readers.read_jsonl(os.path.join(d("removed"), name))}
    return times[0], sum(times[1:]), removed


def scaling(docs, tmp):
    path = os.path.join(tmp, "scale.jsonl")
    readers.write_jsonl(docs, path)
    recipe = validate({"input": {"paths": [path]}, "step": [
        {"name": "gopher_repetition"}, {"name": "gopher_quality"}, {"name": "c4", "terminal_punctuation": False},
        {"name": "fineweb"}, {"name": "minhash_dedup"}]})
    out = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        pipeline.run(recipe, os.path.join(tmp, f"run{workers}"), n_tasks=2, workers=workers, log=lambda *a: None)
        out[workers] = time.perf_counter() - t0
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=2000)
    args = p.parse_args()
    docs, source = corpus(args.docs)
    mb = sum(len(d["text"].encode()) for d in docs) / 1e6
    print(f"corpus: {len(docs)} documents, {mb:.1f} MB from {source}; one process unless stated")
    dt_steps, dt_run = datatrove_filters()
    print(f"\n{'step':<18} {'docs/s':>9} {'MB/s':>7} {'kept':>6}" + (
        f" {'datatrove docs/s':>17} {'dt/ours':>8} {'agree':>7}" if dt_steps else ""))
    for name, fn in OURS.items():
        sec, keep = timed(fn, docs)
        line = f"{name:<18} {len(docs) / sec:>9.0f} {mb / sec:>7.2f} {np.mean(keep):>6.1%}"
        if dt_steps and name in dt_steps:
            dsec, dkeep = dt_run(name, docs)
            agree = np.mean([a == b for a, b in zip(keep, dkeep)])
            line += f" {len(docs) / dsec:>17.0f} {dsec / sec:>8.2f} {agree:>7.1%}"
        print(line)
    with tempfile.TemporaryDirectory() as tmp:
        sig, rest, ours = our_minhash(docs)
        print(f"\nminhash signatures  {len(docs) / sig:>9.0f} docs/s {mb / sig:>7.2f} MB/s; buckets + clusters "
              f"{rest:.2f}s; {len(ours)} duplicates")
        if dt_steps:
            dsig, drest, theirs = datatrove_minhash(docs, tmp)
            both = len(ours & theirs)
            agree = 1 - len(ours ^ theirs) / len(docs)
            print(f"datatrove minhash   {len(docs) / dsig:>9.0f} docs/s (signatures, with its reader); buckets + "
                  f"cluster + filter {drest:.2f}s; {len(theirs)} duplicates; {both} removed by both; "
                  f"decisions agree on {agree:.1%}; signature time dt/ours {dsig / sig:.2f}")
        else:
            print("datatrove not installed: no reference comparison (pip install datatrove spacy)")
        t = scaling(docs, tmp)
        print(f"\npipeline (4 filters + MinHash, 2 tasks): 1 worker {t[1]:.1f}s, 2 workers {t[2]:.1f}s: "
              f"speedup {t[1] / t[2]:.2f}x; {len(docs) / t[2] / 2:.0f} docs/s per worker at 2 workers")


if __name__ == "__main__":
    main()
