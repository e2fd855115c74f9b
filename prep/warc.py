"""Common Crawl input: WARC records (raw HTTP responses) and WET records (extracted text), read with the standard
library, and HTML main-text extraction.

A WARC file is a sequence of records: a `WARC/1.0` line, header lines, a blank line, then Content-Length bytes of
block. Common Crawl gzips each record as its own member, which is what lets prep split one file across tasks.
Request, metadata and warcinfo records are not documents and are passed over; every response becomes a document (a
non-HTML one with empty text, which the extract step removes and counts).
"""
import functools
import gzip
import importlib.util
import os
import re
import warnings
import zlib
from html.parser import HTMLParser

HTML_TYPES = ("text/html", "application/xhtml+xml")
_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_.:-]+)""", re.I)


def iter_records(stream):
    """(headers with lower-case names, block bytes) for each record of a WARC stream."""
    while True:
        line = stream.readline()
        if not line:
            return
        if not line.strip():
            continue  # the two CRLFs that end every record
        if not line.startswith(b"WARC/"):
            raise ValueError(f"expected a 'WARC/1.x' record start, got {line[:40]!r}")
        headers = {}
        for line in iter(stream.readline, b""):
            if not line.strip():
                break
            name, _, value = line.decode("utf-8", "replace").partition(":")
            headers[name.strip().lower()] = value.strip()
        try:
            n = int(headers["content-length"])
        except (KeyError, ValueError):
            raise ValueError("WARC record without a valid Content-Length") from None
        block = stream.read(n)
        if len(block) < n:
            raise ValueError(f"truncated WARC record: {len(block)} of {n} bytes")
        yield headers, block


def split_http(block):
    """(status code, headers, body) of an HTTP response block."""
    head, _, body = block.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    encoding = headers.get("content-encoding", "").lower()
    if encoding in ("gzip", "x-gzip"):
        body = gzip.decompress(body)
    elif encoding == "deflate":
        body = zlib.decompress(body)
    return status, headers, body


def _dechunk(body):
    out, pos = [], 0
    while pos < len(body):
        eol = body.find(b"\r\n", pos)
        size = int(body[pos:eol].split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(body[eol + 2:eol + 2 + size])
        pos = eol + 2 + size + 2
    return b"".join(out)


def decode_html(body, content_type):
    """Text of an HTML body: the charset the HTTP header or a <meta> tag declares, else
    UTF-8. Raises ValueError (non-decodable bytes, unknown charset): counted as errored."""
    m = re.search(r"charset=([\w.:-]+)", content_type, re.I) or _CHARSET.search(body[:4096])
    charset = m.group(1) if m else "utf-8"
    charset = charset.decode("ascii", "replace") if isinstance(charset, bytes) else charset
    try:
        return body.decode(charset)
    except LookupError:
        raise ValueError(f"unknown charset {charset!r}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"bytes not valid {charset}: {e}") from None


def read_warc(stream, path, offset, fmt, max_doc_bytes):
    """(doc, None) per response (fmt "warc") or conversion (fmt "wet") record, (None, error) per record that
    cannot be read; errors name the file, the block's byte offset and the record's number within the block."""
    want = "response" if fmt == "warc" else "conversion"
    records = iter_records(stream)
    for i in range(1 << 62):
        where = {"file": path, "byte": offset, "record": i}
        try:
            headers, block = next(records)
        except StopIteration:
            return
        except (ValueError, OSError, EOFError, zlib.error) as e:
            yield None, {**where, "error": f"{type(e).__name__}: {e}"}  # cannot resync inside this block
            return
        if headers.get("warc-type") != want:
            continue
        meta = {"url": headers.get("warc-target-uri", "").strip("<>"), "date": headers.get("warc-date", ""),
                "origin": f"{os.path.basename(path)}@{offset}#{i}"}
        doc_id = headers.get("warc-record-id", f"{path}@{offset}#{i}").strip("<>")
        try:
            if len(block) > max_doc_bytes:
                raise ValueError(f"oversized document: {len(block)} bytes > {max_doc_bytes}")
            if fmt == "wet":
                meta["language"] = headers.get("warc-identified-content-language", "")
                yield {"id": doc_id, "text": block.decode("utf-8"), "meta": meta}, None
                continue
            status, http, body = split_http(block)
            content_type = http.get("content-type", "")
            meta.update(status=status, content_type=content_type.split(";")[0].strip().lower())
            text = decode_html(body, content_type) if meta["content_type"] in HTML_TYPES else ""
            yield {"id": doc_id, "text": text, "meta": meta}, None
        except (ValueError, UnicodeDecodeError, OSError, zlib.error) as e:
            yield None, {**where, "error": f"{type(e).__name__}: {e}"}


# --- HTML -> main text -------------------------------------------------------------------

class _TextParser(HTMLParser):
    """Visible text of a page, without script/style and page furniture (nav, header,
    footer, aside, forms); block elements end a line."""
    SKIP = {"script", "style", "noscript", "nav", "header", "footer", "aside", "form", "template", "svg",
            "iframe", "button", "select"}
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table", "section",
             "article", "pre", "blockquote", "dd", "dt", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skipping = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_parser_text(html):
    """The stdlib fallback extractor: visible text, whitespace collapsed, one line per block.
    Cruder than trafilatura (no main-content detection beyond the skipped elements)."""
    p = _TextParser()
    p.feed(html)
    p.close()
    lines = (" ".join(line.split()) for line in "".join(p.parts).split("\n"))
    return "\n".join(line for line in lines if line)


@functools.lru_cache(maxsize=1)
def extractors():
    """{extractor: None where it imports, else why not: "not installed", or the ImportError's
    message}, in order of preference (FineWeb used trafilatura); html.parser is the stdlib's."""
    found = {}
    for name, module in (("trafilatura", "trafilatura"), ("resiliparse", "resiliparse.extract.html2text")):
        try:
            importlib.import_module(module)
            found[name] = None
        except ImportError as e:  # not installed, or installed and broken (lxml without lxml_html_clean)
            found[name] = "not installed" if importlib.util.find_spec(name) is None else str(e)
    return {**found, "html.parser": None}


def html_to_text(html, extractor="trafilatura"):
    if extractor == "trafilatura":
        import trafilatura
        from trafilatura.deduplication import LRU_TEST
        # deduplicate=True counts text blocks in a process-wide cache and drops a block seen 3 times
        # before, so a page's text would depend on which pages its process extracted first, that is
        # on the task split. Cleared for every page, the deduplication is within the page.
        LRU_TEST.clear()
        # FineWeb's settings (datatrove Trafilatura(favour_precision=True)): precision over recall.
        return trafilatura.extract(html, favor_precision=True, include_comments=False, deduplicate=True) or ""
    if extractor == "resiliparse":
        from resiliparse.extract.html2text import extract_plain_text
        return extract_plain_text(html, main_content=True)
    if extractor == "html.parser":
        return html_parser_text(html)
    raise ValueError(f"unknown extractor {extractor!r}; choose trafilatura, resiliparse, html.parser or auto")


def extract(doc, extractor="auto"):
    """Step: replace a WARC response's HTML by its main text (other documents pass as they are; non-HTML responses
    are removed). "auto" takes the best extractor that imports (trafilatura, resiliparse, then the stdlib
    html.parser fallback), and warns, once per process, why it passed over one that is installed; naming one that
    does not import is an error that says why (the ImportError's message)."""
    found = extractors()
    if extractor == "auto":
        extractor = next(name for name, why in found.items() if why is None)
        for name, why in found.items():
            if name == extractor:
                break
            if why != "not installed":
                warnings.warn(f"extract: {name} is installed but does not import ({why}); using {extractor}")
    elif found.get(extractor):
        raise ImportError(f"extract: extractor={extractor!r}: {found[extractor]} (see requirements-prep.txt)")
    if "content_type" not in doc["meta"]:
        return None  # not from a WARC response: already text (JSONL, WET, a tree)
    if doc["meta"]["content_type"] not in HTML_TYPES:
        return "not_html"
    doc["text"] = html_to_text(doc["text"], extractor)
    doc["meta"]["extractor"] = extractor
    return None if doc["text"].strip() else "no_text"
