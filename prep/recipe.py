"""Recipes: a TOML file naming an input and a list of steps, validated against the step
functions' own signatures, and compiled into stages (see prep/pipeline.py for how they run).

    [input]   paths (files, globs, directories; "stdlib"), format, suffixes, max_doc_bytes
    [output]  dir, tokens (default DIR/tokens), removed_samples (per task and reason; -1: all)
    [[step]]  name = "<step>", then that step's settings (any keyword of its function)

Per-document steps are the functions in DOC_STEPS; the steps that need every document
(dedup, shuffle, tokenizer, tokenize) are GLOBAL_STEPS, with their defaults.
"""
import inspect
import tomllib

from prep import dedup, filters, quality, readers, warc
from prep.tokenizer import SPECIAL_TOKENS

DOC_STEPS = {"url_filter": filters.url_filter, "extract": warc.extract, "language": filters.language,
             "gopher_repetition": filters.gopher_repetition, "gopher_quality": filters.gopher_quality,
             "c4": filters.c4, "c4_bad_words": filters.c4_bad_words, "fineweb": filters.fineweb, "code": filters.code,
             "classifier": quality.classifier, "perplexity": quality.perplexity, "pii": filters.pii, "tag": filters.tag}
# Steps that see all documents, with their settings and defaults.
GLOBAL_STEPS = {
    "exact_dedup": {},
    "minhash_dedup": {"ngram": dedup.MINHASH_NGRAM, "bands": dedup.MINHASH_BANDS, "rows": dedup.MINHASH_ROWS,
                      "seed": 1},
    "shuffle": {"seed": 0},
    "tokenizer": {"vocab_size": 8192, "sample_chars": 50_000_000, "seed": 0},
    "tokenize": {"val_fraction": 0.005, "shard_tokens": 1 << 24, "tokenizer": ""},
}
INPUT_DEFAULTS = {"paths": [], "format": "jsonl", "suffixes": list(readers.TEXT_SUFFIXES),
                  "max_doc_bytes": readers.MAX_DOC_BYTES}
OUTPUT_DEFAULTS = {"dir": "", "tokens": "", "removed_samples": 20}  # tokens: default DIR/tokens
INF = float("inf")
_REQUIRED = object()  # the default of a step setting that has none
# Numeric settings that must lie in [low, high), checked at load wherever they appear: val_fraction 1
# would leave no training tokens, a vocabulary needs the 256 bytes and the special tokens.
RANGES = {"val_fraction": (0, 1), "vocab_size": (256 + len(SPECIAL_TOKENS), INF), "removed_samples": (-1, INF),
          **{k: (1, INF) for k in ("bands", "rows", "ngram", "sample_chars", "shard_tokens", "max_doc_bytes")}}
CHOICES = {"word_split": ("auto", "regex"), "backend": ("fasttext", "py3langid"),
           "extractor": ("auto", "trafilatura", "resiliparse", "html.parser")}


def load_recipe(path, overrides=()):
    """The recipe as a dict with defaults filled in; `overrides` are "section.key=value" or
    "step_name.key=value" strings (value in TOML syntax). Unknown names are errors."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the recipe: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    for item in overrides:
        key, eq, value = item.partition("=")
        section, _, name = key.strip().partition(".")
        if not eq or not name:
            raise ValueError(f"--set {item}: expected name.key=value")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--set {item}: the value is not TOML ({e}); a string needs quotes: key='text'") from None
        steps = [s for s in raw.get("step", []) if s.get("name") == section]
        if section in ("input", "output"):
            raw.setdefault(section, {})[name] = parsed
        elif steps:
            steps[0][name] = parsed
        else:
            raise ValueError(f"--set {key}: no section or step named {section!r} in {path}")
    return validate(raw, path)


def validate(raw, path="recipe"):
    unknown = set(raw) - {"input", "output", "step"}
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}; valid: input, output, step")
    recipe = {"input": _merge(INPUT_DEFAULTS, raw.get("input", {}), f"{path} [input]"),
              "output": _merge(OUTPUT_DEFAULTS, raw.get("output", {}), f"{path} [output]"), "step": []}
    if recipe["input"]["format"] not in readers.FORMATS:
        raise ValueError(f"{path} [input] format: {recipe['input']['format']!r} is not one of {readers.FORMATS}")
    for i, step in enumerate(raw.get("step", [])):
        name = step.get("name")
        where = f"{path} step {i + 1} ({name})"
        settings = {k: v for k, v in step.items() if k != "name"}
        if name in DOC_STEPS:
            valid = _step_params(DOC_STEPS[name])
            _check(valid, settings, where, "setting(s)")
            required = [k for k, v in valid.items() if v is _REQUIRED and k not in settings]
            if required:
                raise ValueError(f"{where}: missing setting(s) {required}")
        elif name in GLOBAL_STEPS:
            settings = _merge(GLOBAL_STEPS[name], settings, where)
        else:
            raise ValueError(f"{where}: unknown step; valid: {sorted(DOC_STEPS) + sorted(GLOBAL_STEPS)}")
        recipe["step"].append({"name": name, **settings})
    return recipe


def _step_params(fn):
    params = list(inspect.signature(fn).parameters.values())[1:]  # after `doc`
    return {p.name: (_REQUIRED if p.default is p.empty else p.default) for p in params}


def _check(defaults, given, where, what="key(s)"):
    """Every given key is one of the defaults', its value of the default's type (a number where a
    float is, a list where a tuple is; anything where None is), in RANGES and CHOICES."""
    bad = set(given) - set(defaults)
    if bad:
        raise ValueError(f"{where}: unknown {what} {sorted(bad)}; valid: {sorted(defaults)}")
    for key, value in given.items():
        default = defaults[key]
        kind = (int, float) if type(default) is float else (list, tuple) if type(default) is tuple else type(default)
        if default is not None and default is not _REQUIRED and (
                not isinstance(value, kind) or isinstance(value, bool) != isinstance(default, bool)):
            raise ValueError(f"{where}: {key} = {value!r}: expected {type(default).__name__}, as the default "
                             f"{default!r}")
        low, high = RANGES.get(key, (-INF, INF))
        if isinstance(value, (int, float)) and not low <= value < high:
            raise ValueError(f"{where}: {key} = {value!r} is outside [{low}, {high})")
        if key in CHOICES and value not in CHOICES[key]:
            raise ValueError(f"{where}: {key} = {value!r} is not one of {CHOICES[key]}")


def _merge(defaults, given, where):
    _check(defaults, given, where)
    return {**defaults, **given}


def compile_stages(recipe, n_tasks):
    """The recipe's steps as a list of stages {"name", "kind", "tasks", ...}."""
    stages = [{"kind": "index", "tasks": n_tasks}]
    docs = {"kind": "docs", "tasks": n_tasks, "source": "blocks", "steps": []}

    def close(next_source):
        nonlocal docs
        if docs["steps"] or docs["source"] != "docs" or docs.get("dedup"):
            stages.append(docs)
        docs = {"kind": "docs", "tasks": n_tasks, "source": next_source, "steps": []}
    for step in recipe["step"]:
        name, settings = step["name"], {k: v for k, v in step.items() if k != "name"}
        if docs is None:
            raise ValueError(f"step {name!r} comes after tokenize; tokenize must be the last step")
        if name in DOC_STEPS:
            docs["steps"].append(step)
            continue
        close("docs")
        if name in ("exact_dedup", "minhash_dedup"):
            kind = "hashes" if name == "exact_dedup" else "signatures"
            stages.append({"kind": kind, "tasks": n_tasks, "settings": settings})
            if name == "minhash_dedup":
                stages.append({"kind": "buckets", "tasks": settings["bands"], "settings": settings})
            stages.append({"kind": "clusters", "tasks": 1, "dedup": name, "settings": settings})
            docs["dedup"] = name
        elif name == "shuffle":
            stages.append({"kind": "scatter", "tasks": n_tasks, "settings": settings})
            docs["source"] = "gather"
        elif name == "tokenizer":
            stages.append({"kind": "tokenizer", "tasks": 1, "settings": settings})
        elif name == "tokenize":
            stages.append({"kind": "tokenize", "tasks": n_tasks, "settings": settings})
            docs = None
    if docs is not None:
        close("docs")
    stages.append({"kind": "summary", "tasks": 1})
    for i, s in enumerate(stages):  # each stage reads the outputs of the last docs stage before it
        s["name"] = f"{i:02d}_{s['kind']}"
        s["docs_from"] = next((p["name"] for p in reversed(stages[:i]) if p["kind"] == "docs"), None)
    return stages
