"""Benchmark of prep/: documents/s and MB/s per worker for each filter and for MinHash,
the pipeline's scaling from 1 to 2 workers, and — where datatrove is installed (a
bench-only reference: pip install datatrove spacy jieba xxhash orjson) — the same documents
through datatrove's Gopher, C4, FineWeb and MinHash steps: its time over ours, and per
corpus the fraction of documents on which the two make the same keep/remove decision, with
every disagreement counted by the two reasons.

    python bench/prep.py [--docs N]

Corpora: "bench", the real text in ../shared/data (C4, CCNet, Wikipedia articles, Bible
passages, stdlib code) plus planted near-duplicates (a few words changed) so MinHash has work;
then each web sample on its own: "c4", "ccnet", and "warc", the main text of the HTML pages
of the WARC samples (prep's extract step, language-tagged by prep's language step; datatrove
gets the same language). Without ../shared/data, the standard library's .py files only.
"""
import argparse
import copy
import csv
import importlib.util
import os
import random
import sys
import tempfile
import time
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prep import dedup, filters, pipeline, readers, warc  # noqa: E402
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


def web_samples():
    """{name: documents} of each real web sample on its own: the C4 sample, the CCNet samples,
    and the main text of the HTML pages of the WARC samples (prep's extract step, with the best
    installed extractor), each page tagged with its language by prep's language step."""
    cc = os.path.join(SHARED, "common_crawl")
    if not os.path.isdir(cc):
        return {}
    read = lambda *names: [d for n in names for d in readers.read_jsonl(os.path.join(cc, n))]  # noqa: E731
    out = {"c4": read("c4_demo.jsonl"), "ccnet": read("ccnet_cc_en_head-0091.jsonl", "ccnet_cc_en_head-0174.jsonl")}
    backend = next((b for b in ("fasttext", "py3langid") if _loads(filters.language_identifier, b)), None)
    pages = []
    for name in sorted(os.listdir(cc)):
        if name.endswith(".warc.gz"):
            path = os.path.join(cc, name)
            for block in readers.index_file(path, "warc"):
                pages += [d for d, _ in readers.read_block(block, "warc") if d is not None]
    pages = [d for d in pages if warc.extract(d) is None]
    for d in pages:
        if backend:
            filters.language(d, languages=(), backend=backend)
    out["warc"] = pages
    return out


def _loads(fn, *args):
    try:
        fn(*args)
        return True
    except ImportError:
        return False


def timed(fn, docs):
    docs = copy.deepcopy(docs)  # some steps rewrite the text
    t0 = time.perf_counter()
    decisions = [fn(d) for d in docs]
    return time.perf_counter() - t0, decisions


def ours(word_split):
    return {"gopher_repetition": lambda d: filters.gopher_repetition(d, word_split=word_split),
            "gopher_quality": lambda d: filters.gopher_quality(d, word_split=word_split),
            "c4": lambda d: filters.c4(d, terminal_punctuation=False),
            "fineweb": lambda d: filters.fineweb(d, word_split=word_split),
            "pii": filters.pii, "tag": filters.tag}


def datatrove_language(code):
    """datatrove's name for a language tag ("en" -> "eng", "zh" -> "cmn"): the row of its
    tokenizer table marked as the default for the two-letter code. Its own lookup of "zh"
    gives the multilingual tokenizer, not jieba."""
    from datatrove.utils._import_utils import ASSETS_PATH
    with open(os.path.join(ASSETS_PATH, "tokenizer_assignment.csv")) as f:
        return next((r["code_3"] for r in csv.DictReader(f) if r["code_1"] == code and r["default_code_1"] == "TRUE"),
                    code)


def datatrove_filters():
    """run(step name, docs) -> (seconds, reasons: None where kept), each document through
    datatrove's filter for its language; None when datatrove is not installed."""
    try:
        from datatrove.data import Document
        from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                                GopherRepetitionFilter)
    except ImportError:
        return None
    make = {"gopher_repetition": GopherRepetitionFilter, "gopher_quality": GopherQualityFilter,
            "c4": lambda language: C4QualityFilter(filter_no_terminal_punct=False, language=language),
            "fineweb": FineWebQualityFilter}
    steps = {}

    def step(name, code):
        language = datatrove_language(code)
        if (name, language) not in steps:
            steps[name, language] = f = make[name](language=language)
            f.filter(Document(text="warm up the word tokenizer.", id="w"))
        return steps[name, language]

    def run(name, docs):
        todo = [(step(name, d["meta"].get("language") or "en"), Document(text=d["text"], id=d["id"])) for d in docs]
        t0 = time.perf_counter()
        out = [f.filter(d) for f, d in todo]
        return time.perf_counter() - t0, [None if r is True else r[1] if isinstance(r, tuple) else "removed"
                                          for r in out]
    return run


def agreement(mine, theirs):
    """The fraction of documents with the same keep/remove decision, and the disagreements by
    reason: {(our reason or "kept", datatrove's reason or "kept"): count}."""
    mine = [r if isinstance(r, str) else None for r in mine]
    differ = Counter((a or "kept", b or "kept") for a, b in zip(mine, theirs) if (a is None) != (b is None))
    return 1 - sum(differ.values()) / max(1, len(mine)), differ


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
        {"name": "gopher_repetition", "word_split": "regex"}, {"name": "gopher_quality", "word_split": "regex"},
        {"name": "c4", "terminal_punctuation": False}, {"name": "fineweb", "word_split": "regex"},
        {"name": "minhash_dedup"}]})
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
    splits = ["regex"] + (["auto"] if importlib.util.find_spec("spacy") else [])  # auto: spaCy, as datatrove
    print(f"corpus: {len(docs)} documents, {mb:.1f} MB from {source}; one process unless stated")
    dt_run = datatrove_filters()
    print(f"\n{'step (words)':<26} {'docs/s':>9} {'MB/s':>7} {'kept':>6}" + (
        f" {'datatrove docs/s':>17} {'dt/ours':>8}" if dt_run else ""))
    dsec = {}
    for split in splits:  # with spaCy installed, the word-based steps again with its words
        for name, fn in ours(split).items():
            if split == "auto" and name not in ("gopher_repetition", "gopher_quality", "fineweb"):
                continue
            sec, keep = timed(fn, docs)
            kept = np.mean([not isinstance(r, str) for r in keep])
            label = name + (" (spaCy)" if split == "auto" else "")
            line = f"{label:<26} {len(docs) / sec:>9.0f} {mb / sec:>7.2f} {kept:>6.1%}"
            if dt_run and name not in ("pii", "tag"):
                dsec[name] = dsec.get(name) or dt_run(name, docs)[0]
                line += f" {len(docs) / dsec[name]:>17.0f} {dsec[name] / sec:>8.2f}"
            print(line)
    if dt_run:
        print_agreement({"bench": docs, **web_samples()}, splits, dt_run)
    with tempfile.TemporaryDirectory() as tmp:
        sig, rest, ours_removed = our_minhash(docs)
        print(f"\nminhash signatures  {len(docs) / sig:>9.0f} docs/s {mb / sig:>7.2f} MB/s; buckets + clusters "
              f"{rest:.2f}s; {len(ours_removed)} duplicates")
        if dt_run:
            dsig, drest, theirs = datatrove_minhash(docs, tmp)
            both = len(ours_removed & theirs)
            agree = 1 - len(ours_removed ^ theirs) / len(docs)
            print(f"datatrove minhash   {len(docs) / dsig:>9.0f} docs/s (signatures, with its reader); buckets + "
                  f"cluster + filter {drest:.2f}s; {len(theirs)} duplicates; {both} removed by both; "
                  f"decisions agree on {agree:.1%}; signature time dt/ours {dsig / sig:.2f}")
        else:
            print("datatrove not installed: no reference comparison (pip install datatrove spacy jieba xxhash orjson)")
        t = scaling(docs, tmp)
        print(f"\npipeline (4 filters, the regex's words, + MinHash; 2 tasks): 1 worker {t[1]:.1f}s, "
              f"2 workers {t[2]:.1f}s: "
              f"speedup {t[1] / t[2]:.2f}x; {len(docs) / t[2] / 2:.0f} docs/s per worker at 2 workers")


def print_agreement(corpora, splits, dt_run):
    """Per corpus and filter, the share of documents on which prep and datatrove make the same
    keep/remove decision, with prep's words from the regex and (where spaCy is installed) from
    the language's tokenizer, as datatrove's; then every disagreement by the two reasons."""
    names = ["gopher_repetition", "gopher_quality", "c4", "fineweb"]
    languages = {c: Counter(d["meta"].get("language") or "untagged" for d in docs) for c, docs in corpora.items()}
    print("\nsame keep/remove decision as datatrove (its word tokenizer for each page's language)")
    print(f"{'corpus':<8} {'docs':>5} {'words':<6} " + " ".join(f"{n:>17}" for n in names) + "  languages")
    reasons = []
    for corpus_name, cdocs in corpora.items():
        theirs = {n: dt_run(n, cdocs)[1] for n in names}
        for split in splits:
            row = f"{corpus_name:<8} {len(cdocs):>5} {split:<6} "
            for n in names:
                frac, differ = agreement(timed(ours(split)[n], cdocs)[1], theirs[n])
                row += f" {frac:>17.1%}"
                reasons += [f"  {corpus_name}, {n}, words {split}: prep {a} / datatrove {b}: {k}"
                            for (a, b), k in differ.most_common()]
            print(row + "  " + ", ".join(f"{k} {v}" for k, v in languages[corpus_name].most_common(4)))
    print("disagreements by reason (prep's / datatrove's; kept = kept):")
    print("\n".join(reasons) or "  none")


if __name__ == "__main__":
    main()
