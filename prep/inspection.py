"""`python -m prep inspect OUT`: what a run kept and removed, and why.

Prints per-stage and per-step removal rates with their reasons, the first errors with file and line, the tokenizer
report, top domains and topics of the output, random kept and removed samples per filter, and (with --grep) a regex
search over the output documents or (with --tokens) over the decoded token shards. `python -m prep diff A B` compares
two runs' manifests: recipe, code, input and output hashes.
"""
import glob
import os
import random
import re
from collections import Counter

from prep import readers


def _pct(n, d):
    return f"{100 * n / d:5.1f}%" if d else "   - "


def print_stats(stats, show_errors=5):
    for name, st in stats["stages"].items():
        if "cluster_sizes" in st:
            print(f"\n[{name}] {st['duplicates']:,} duplicates of {st['documents']:,} documents in {st['clusters']:,} "
                  f"clusters; cluster sizes: {st['cluster_sizes']}")
            for c in st["largest_clusters"][:3]:
                print(f"  kept {c['kept']} for a cluster of {c['size']}; removed e.g. {c['removed'][:3]}")
        if "steps" not in st:
            continue
        print(f"\n[{name}] in {st['in']:,}  kept {st['kept']:,}  removed {st['removed']:,}  "
              f"errored {st['errored']:,}  ({st['seconds']:.1f} task-seconds)")
        for step, s in st["steps"].items():
            removed = sum(s["removed"].values())
            reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(s["removed"].items(), key=lambda x: -x[1]))
            print(f"  {step:<18} in {s['in']:>9,}  removed {_pct(removed, s['in'])}  errored {s['errored']:,}"
                  + (f"  ({reasons})" if reasons else ""))
            if s["counters"]:
                print(" " * 21 + ", ".join(f"{k} {v:,}" for k, v in sorted(s["counters"].items())))
        for e in st["errors"][:show_errors]:
            where = e.get("location") or ":".join(str(e[k]) for k in ("file", "line", "byte", "record") if k in e)
            print(f"  error: {where}: {e['error']}")


def last_docs_files(out):
    stages = sorted(d for d in os.listdir(out) if re.fullmatch(r"\d\d_docs", d))
    return sorted(glob.glob(os.path.join(out, stages[-1], "docs_*.jsonl.gz"))) if stages else []


def print_samples(out, n, rng, width=240):
    removed = {}
    for path in sorted(glob.glob(os.path.join(out, "*_docs", "removed_*.jsonl.gz"))):
        for doc in readers.read_jsonl(path):
            removed.setdefault(doc["meta"]["removed_by"], []).append(doc)
    for reason, docs in sorted(removed.items()):
        print(f"\n-- removed by {reason} ({len(docs)} sampled)")
        for doc in rng.sample(docs, min(n, len(docs))):
            print(f"   {doc['meta'].get('location', doc['id'])}: {doc['text'][:width]!r}")
    kept = [d for p in last_docs_files(out) for d in readers.read_jsonl(p)]
    print(f"\n-- kept ({len(kept):,} documents)")
    for doc in rng.sample(kept, min(n, len(kept))):
        print(f"   {doc['id']}: {doc['text'][:width]!r}")
    return kept


def print_tags(kept, top):
    domains = Counter(d["meta"].get("domain") for d in kept if d["meta"].get("domain"))
    topics = Counter(d["meta"]["topic"] for d in kept if "topic" in d["meta"])
    if domains:
        print("\ntop domains: " + ", ".join(f"{d} {n}" for d, n in domains.most_common(top)))
    if topics:
        print("topics: " + ", ".join(f"{t} {n}" for t, n in topics.most_common()))


def grep(out, pattern, limit=20, width=80):
    """Every match of a regex in the output documents: file:line and the text around it."""
    rx, hits = re.compile(pattern), 0
    for path in last_docs_files(out):
        for i, doc in enumerate(readers.read_jsonl(path), 1):
            for m in rx.finditer(doc["text"]):
                hits += 1
                if hits <= limit:
                    a, b = max(0, m.start() - width), m.end() + width
                    print(f"{os.path.relpath(path, out)}:{i} {doc['id']}: ...{doc['text'][a:b]!r}...")
    print(f"{hits} match(es) of {pattern!r}")
    return hits


def grep_tokens(tokens_dir, pattern, limit=20, width=80):
    """A regex search over the token shards themselves, decoded document by document (each
    starts at BOS): what a model trained on them actually reads."""
    import numpy as np
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(tokens_dir, "tokenizer.json"))
    rx, hits = re.compile(pattern), 0
    for path in sorted(glob.glob(os.path.join(tokens_dir, "*.bin"))):
        meta = readers.read_json(path[:-len(".bin")] + ".json")
        ids = np.fromfile(path, dtype=meta["dtype"])
        starts = np.flatnonzero(ids == meta["bos_id"]).tolist() + [len(ids)]
        for i, (a, b) in enumerate(zip(starts, starts[1:])):
            text = tok.decode(ids[a + 1:b].tolist(), skip_special_tokens=False)
            for m in rx.finditer(text):
                hits += 1
                if hits <= limit:
                    around = text[max(0, m.start() - width):m.end() + width]
                    print(f"{os.path.basename(path)} document {i}: ...{around!r}...")
    print(f"{hits} match(es) of {pattern!r} in the token shards")
    return hits


def diff(a, b):
    """What differs between two runs' manifests: recipe, code, inputs and outputs."""
    ma, mb = (readers.read_json(os.path.join(d, "manifest.json")) for d in (a, b))
    changes = 0
    for key in ("recipe_sha256", "tasks", "code"):
        if ma[key] != mb[key]:
            changes += 1
            print(f"{key}: {ma[key]} -> {mb[key]}")
    for part in ("inputs", "outputs"):
        fa, fb = ({f["path"]: f["sha256"] for f in m[part]} for m in (ma, mb))
        for path in sorted(fa.keys() | fb.keys()):
            if fa.get(path) != fb.get(path):
                changes += 1
                what = "added" if path not in fa else "removed" if path not in fb else "changed"
                print(f"{part[:-1]} {what}: {path}")
    print(f"{changes} difference(s) between {a} and {b}")
    return changes


def _tokens_dir(out):
    recipe = readers.read_json(os.path.join(out, "recipe.json"))["recipe"]
    return recipe["output"]["tokens"] or os.path.join(out, "tokens")


def inspect(out, samples=3, pattern=None, seed=0, top=10, tokens=False):
    if pattern:
        return grep_tokens(_tokens_dir(out), pattern) if tokens else grep(out, pattern)
    print_stats(readers.read_json(os.path.join(out, "stats.json")))
    report = os.path.join(_tokens_dir(out), "tokenizer.stats.json")
    if os.path.exists(report):
        t = readers.read_json(report)
        print(f"\ntokenizer: vocab {t['vocab_size']}, {t['bytes_per_token']:.2f} bytes/token, "
              f"{t['unused_tokens']} tokens unused on held-out text")
        print(f"  longest: {t['longest_tokens'][:8]}")
        print(f"  least used: {t['least_used_tokens'][:8]}")
    kept = print_samples(out, samples, random.Random(seed))
    print_tags(kept, top)
