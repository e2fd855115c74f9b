"""Readers: turn sources into documents {"id", "text", "meta"} and write them as JSONL.

A reader never drops input silently: what it cannot read (a non-UTF-8 file, a malformed
JSON line) is appended to the caller's `errors` list with the file (and line) and why.
"""
import gzip
import json
import os
import sysconfig

# Text and code that make a useful corpus; anything else in a tree is skipped by suffix.
TEXT_SUFFIXES = (".py", ".md", ".rst", ".txt", ".c", ".h", ".js", ".ts", ".go", ".rs", ".java",
                 ".sh", ".toml", ".yaml", ".yml", ".json", ".html", ".css", ".sql")


def stdlib_root():
    """The running interpreter's standard library: real code and English docstrings that
    every machine has, so the demo needs no download."""
    return sysconfig.get_paths()["stdlib"]


def open_text(path, mode="rt", gz=None):
    """open() that reads and writes .gz transparently, always UTF-8."""
    if path.endswith(".gz") if gz is None else gz:
        return gzip.open(path, mode, encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def read_tree(root, suffixes=TEXT_SUFFIXES, errors=None, skip_dirs=("site-packages", "__pycache__", ".git")):
    """Every file under root with one of the suffixes, in sorted (reproducible) order."""
    errors = [] if errors is None else errors
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for name in sorted(filenames):
            if not name.endswith(suffixes):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            try:
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8")
            except (UnicodeDecodeError, OSError) as e:
                errors.append({"file": path, "error": f"{type(e).__name__}: {e}"})
                continue
            yield {"id": rel, "text": text, "meta": {"source": "tree", "path": rel, "bytes": len(text.encode())}}


def read_jsonl(path, errors=None):
    """Documents from a JSONL(.gz) file. A line that is not a JSON object with a string
    "text" is recorded in `errors` with its line number (or raised when errors is None)."""
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line.decode("utf-8"))
                if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                    raise ValueError('expected a JSON object with a string "text"')
            except (ValueError, UnicodeDecodeError) as e:
                if errors is None:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
                errors.append({"file": path, "line": lineno, "error": str(e)})
                continue
            doc.setdefault("id", f"{os.path.basename(path)}:{lineno}")
            doc.setdefault("meta", {})
            yield doc


def write_jsonl(docs, path):
    """Write documents to path (gzip if it ends in .gz) atomically; returns the count."""
    tmp = path + ".tmp"
    n = 0
    with open_text(tmp, "wt", gz=path.endswith(".gz")) as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
