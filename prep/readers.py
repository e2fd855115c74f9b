"""Readers: turn sources into documents {"id", "text", "meta"} and write them as JSONL.

A reader never drops input silently: what it cannot read (a non-UTF-8 file, a malformed
JSON line, a bad gzip member, an oversized document) is reported as an error naming the
file and the line (or the byte offset, where lines mean nothing: gzip members, WARC records).

Inputs are cut into *blocks* that a task can read on its own — ~1 MB runs of lines in a
plain file, runs of gzip members in a .gz file (Common Crawl compresses every WARC record
as its own member), one file of a tree — so work is split by size, not by whole file.
"""
import gzip
import io
import json
import os
import sysconfig
import zlib

# Text and code that make a useful corpus; anything else in a tree is skipped by suffix.
TEXT_SUFFIXES = (".py", ".md", ".rst", ".txt", ".c", ".h", ".js", ".ts", ".go", ".rs", ".java",
                 ".sh", ".toml", ".yaml", ".yml", ".json", ".html", ".css", ".sql")
FORMATS = ("jsonl", "lines", "tree", "warc", "wet")
BLOCK_BYTES = 1 << 20      # the unit of work splitting: about 1 MB of input
GZIP_MEMBER_BYTES = 1 << 20  # write_jsonl starts a new gzip member every ~1 MB, so outputs split too
GZIP_LEVEL = 1  # 10x faster than the default 9 for ~30% larger files: outputs are rewritten by every stage
# Common Crawl truncates every fetched record at 1 MiB; a larger document is an error, not text.
MAX_DOC_BYTES = 1 << 20


def stdlib_root():
    """The running interpreter's standard library: real code and English docstrings that
    every machine has, so the demo needs no download."""
    return sysconfig.get_paths()["stdlib"]


def open_text(path, mode="rt", gz=None):
    """open() that reads and writes .gz transparently, always UTF-8."""
    if path.endswith(".gz") if gz is None else gz:
        return gzip.open(path, mode, encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def tree_files(root, suffixes=TEXT_SUFFIXES, skip_dirs=("site-packages", "__pycache__", ".git")):
    """Every file under root with one of the suffixes, in sorted (reproducible) order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for name in sorted(filenames):
            if name.endswith(tuple(suffixes)):
                yield os.path.join(dirpath, name)


def read_tree_file(path, root):
    """One file of a tree as a document; raises UnicodeDecodeError/OSError."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8")
    rel = os.path.relpath(path, root)
    return {"id": rel, "text": text, "meta": {"source": "tree", "path": rel, "bytes": len(text.encode())}}


def read_tree(root, suffixes=TEXT_SUFFIXES, errors=None, skip_dirs=("site-packages", "__pycache__", ".git")):
    """Documents for every file under root with one of the suffixes; unreadable files go to errors."""
    errors = [] if errors is None else errors
    for path in tree_files(root, suffixes, skip_dirs):
        try:
            yield read_tree_file(path, root)
        except (UnicodeDecodeError, OSError) as e:
            errors.append({"file": path, "error": f"{type(e).__name__}: {e}"})


def parse_jsonl_line(line, path, lineno, max_bytes=None):
    """A document from one JSONL line (bytes); raises ValueError saying what is wrong."""
    if max_bytes and len(line) > max_bytes:
        raise ValueError(f"oversized document: {len(line)} bytes > {max_bytes}")
    try:
        doc = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"non-UTF-8 bytes: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        raise ValueError('expected a JSON object with a string "text"')
    doc.setdefault("id", f"{os.path.basename(path)}:{lineno}")
    doc.setdefault("meta", {})
    return doc


def read_jsonl(path, errors=None):
    """Documents from a JSONL(.gz) file. A line that is not a JSON object with a string
    "text" is recorded in `errors` with its line number (or raised when errors is None)."""
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield parse_jsonl_line(line, path, lineno)
            except ValueError as e:
                if errors is None:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
                errors.append({"file": path, "line": lineno, "error": str(e)})


def write_jsonl(docs, path):
    """Write documents to path atomically; returns the count. A .gz path gets a new gzip member every ~1 MB (still
    one valid gzip file), so it can be split into blocks, and mtime 0 in the headers: same documents, same bytes."""
    tmp, n, gz = path + ".tmp", 0, path.endswith(".gz")
    with open(tmp, "wb") as f:
        buf, size = [], 0
        for doc in docs:
            line = (json.dumps(doc, ensure_ascii=False) + "\n").encode()
            buf.append(line)
            size += len(line)
            n += 1
            if size >= GZIP_MEMBER_BYTES:
                f.write(gzip.compress(b"".join(buf), GZIP_LEVEL, mtime=0) if gz else b"".join(buf))
                buf, size = [], 0
        if buf or (gz and n == 0):
            f.write(gzip.compress(b"".join(buf), GZIP_LEVEL, mtime=0) if gz else b"".join(buf))
    os.replace(tmp, path)
    return n


# --- blocks: the unit of work splitting -------------------------------------------------

def index_tree(root, suffixes=TEXT_SUFFIXES):
    """One block per file of a tree (a file is one document)."""
    return [{"file": p, "offset": 0, "length": os.path.getsize(p), "line": 0, "root": root}
            for p in tree_files(root, suffixes)]


def index_file(path, fmt):
    """Cut one input file into blocks [{"file", "offset", "length", "line"}] where `line` is
    the number of lines before the block (for error messages). A gzip member that does not
    decompress becomes a block with an "error", so readers count it instead of crashing."""
    with open(path, "rb") as f:
        if path.endswith(".gz"):
            return _gzip_blocks(f, path)
        if fmt in ("warc", "wet"):  # an uncompressed WARC is not split: records have no line structure
            return [{"file": path, "offset": 0, "length": os.path.getsize(path), "line": 0}]
        return _plain_blocks(f, path)


def _plain_blocks(f, path):
    blocks, start, lines = [], 0, 0
    while True:
        chunk = f.read(BLOCK_BYTES)
        if not chunk:
            break
        chunk += f.readline()  # finish the line: blocks start at line starts
        blocks.append({"file": path, "offset": start, "length": len(chunk), "line": lines})
        lines += chunk.count(b"\n")
        start += len(chunk)
    return blocks


def _gzip_members(f):
    """(offset, length, newlines, ends_with_newline, error) for each gzip member of f."""
    GZ_MAGIC = b"\x1f\x8b\x08"
    pos = start = 0
    d, lines, last, buf = zlib.decompressobj(31), 0, b"\n", b""
    while True:
        if not buf:
            buf = f.read(1 << 20)
            if not buf:
                break
        try:
            out = d.decompress(buf)
        except zlib.error as e:  # skip to the next gzip header after the bad member's start
            f.seek(start + 1)
            rest = f.read()
            nxt = rest.find(GZ_MAGIC)
            end = start + 1 + nxt if nxt >= 0 else start + 1 + len(rest)
            yield start, end - start, 0, True, f"bad gzip member: {e}"
            f.seek(end)
            pos = start = end
            d, lines, last, buf = zlib.decompressobj(31), 0, b"\n", b""
            continue
        if out:
            lines += out.count(b"\n")
            last = out[-1:]
        if d.eof:
            pos += len(buf) - len(d.unused_data)
            yield start, pos - start, lines, last == b"\n", None
            buf, start = d.unused_data, pos
            d, lines, last = zlib.decompressobj(31), 0, b"\n"
        else:
            pos += len(buf)
            buf = b""
    if pos > start:  # a member cut short: read as far as it goes, its complete lines kept, the cut one an error
        yield start, pos - start, lines, True, None


def _gzip_blocks(f, path):
    """Runs of whole members, cut only where a member ends a line."""
    blocks, lines, cur = [], 0, None
    for offset, length, n_lines, ends_line, error in _gzip_members(f):
        if error:
            if cur:
                blocks.append(cur)
            blocks.append({"file": path, "offset": offset, "length": length, "line": lines, "error": error})
            cur = None
            continue
        if cur is None:
            cur = {"file": path, "offset": offset, "length": 0, "line": lines}
        cur["length"] += length
        lines += n_lines
        if ends_line and cur["length"] >= BLOCK_BYTES:
            blocks.append(cur)
            cur = None
    if cur:
        blocks.append(cur)
    return blocks


class _Window(io.RawIOBase):
    """A read-only view of bytes [offset, offset + length) of an open file."""

    def __init__(self, f, offset, length):
        self.f, self.left = f, length
        f.seek(offset)

    def readable(self):
        return True

    def readinto(self, b):
        data = self.f.read(min(len(b), self.left))
        self.left -= len(data)
        b[:len(data)] = data
        return len(data)


def open_block(f, block):
    """A binary stream of a block's (decompressed) bytes."""
    raw = io.BufferedReader(_Window(f, block["offset"], block["length"]), 1 << 16)
    return gzip.GzipFile(fileobj=raw) if block["file"].endswith(".gz") else raw


def read_block(block, fmt, max_doc_bytes=MAX_DOC_BYTES):
    """Yield (doc, None) for each document of a block and (None, error) for each thing
    that could not be read; an error is {"file", "line" or "byte", "error"}."""
    path = block["file"]
    if "error" in block:
        yield None, {"file": path, "byte": block["offset"], "error": block["error"]}
        return
    if fmt == "tree":
        try:
            if os.path.getsize(path) > max_doc_bytes:
                raise ValueError(f"oversized document: {os.path.getsize(path)} bytes > {max_doc_bytes}")
            doc = read_tree_file(path, block["root"])
            doc["meta"]["origin"] = doc["id"]
            yield doc, None
        except (UnicodeDecodeError, OSError, ValueError) as e:
            yield None, {"file": path, "error": f"{type(e).__name__}: {e}"}
        return
    with open(path, "rb") as f:
        stream = open_block(f, block)
        if fmt in ("warc", "wet"):
            from prep.warc import read_warc  # the WARC reader is only needed for web input
            yield from read_warc(stream, path, block["offset"], fmt, max_doc_bytes)
            return
        lineno = block["line"]
        try:
            for line in stream:
                lineno += 1
                if not line.strip():
                    continue
                try:
                    doc = (parse_jsonl_line if fmt == "jsonl" else _text_line)(line, path, lineno, max_doc_bytes)
                    doc["meta"]["origin"] = f"{os.path.basename(path)}:{lineno}"
                    yield doc, None
                except ValueError as e:
                    yield None, {"file": path, "line": lineno, "error": str(e)}
        except (OSError, EOFError, zlib.error) as e:  # a member that went bad after the index was made
            yield None, {"file": path, "line": lineno + 1, "error": f"{type(e).__name__}: {e}"}


def _text_line(line, path, lineno, max_bytes):
    """Format "lines": every non-empty line of a text file is a document."""
    if len(line) > max_bytes:
        raise ValueError(f"oversized document: {len(line)} bytes > {max_bytes}")
    try:
        text = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"non-UTF-8 bytes: {e}") from None
    return {"id": f"{os.path.basename(path)}:{lineno}", "text": text, "meta": {"source": path}}
