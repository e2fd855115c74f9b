"""Readers: blocks of gzip members and lines, bad input counted with file and line, the
stdlib WARC reader (against warcio where installed), balanced task splitting."""
import gzip
import json
import os
import sys
import zlib

import pytest

from conftest import SHARED_DATA
from prep import pipeline, readers, warc


def read_all(path, fmt="jsonl", max_doc_bytes=readers.MAX_DOC_BYTES):
    docs, errors = [], []
    for block in readers.index_file(str(path), fmt):
        for doc, err in readers.read_block(block, fmt, max_doc_bytes):
            (errors.append(err) if err else docs.append(doc))
    return docs, errors


def jsonl(i):
    return json.dumps({"id": f"d{i}", "text": f"document {i}"}) + "\n"


def test_bad_gzip_member_is_one_error_and_reading_goes_on(tmp_path):
    good1 = gzip.compress("".join(jsonl(i) for i in range(3)).encode(), mtime=0)
    bad = bytearray(gzip.compress("".join(jsonl(i) for i in range(3, 6)).encode(), mtime=0))
    bad[12:20] = b"\x00" * 8  # corrupt the deflate stream
    good2 = gzip.compress("".join(jsonl(i) for i in range(6, 9)).encode(), mtime=0)
    path = tmp_path / "mixed.jsonl.gz"
    path.write_bytes(good1 + bytes(bad) + good2)
    docs, errors = read_all(path)
    assert [d["id"] for d in docs] == ["d0", "d1", "d2", "d6", "d7", "d8"]
    assert len(errors) == 1 and errors[0]["byte"] == len(good1) and "gzip" in errors[0]["error"]


def test_a_cut_gzip_member_keeps_its_complete_lines_and_counts_the_cut_one(tmp_path):
    whole = gzip.compress("".join(jsonl(i) for i in range(400)).encode(), mtime=0)
    d400 = gzip.compress(jsonl(400).encode(), mtime=0)
    for before, cut in ((b"", whole[:len(whole) // 2]), (d400, whole[:len(whole) // 3])):  # alone, after a member
        (tmp_path / "cut.jsonl.gz").write_bytes(before + cut)
        complete = zlib.decompressobj(31).decompress(cut).count(b"\n")  # independent: the cut bytes' newlines
        first = ["d400"] if before else []
        docs, errors = read_all(tmp_path / "cut.jsonl.gz")
        assert 50 < complete < 400 and [d["id"] for d in docs] == first + [f"d{i}" for i in range(complete)]
        assert len(errors) == 1 and errors[0]["line"] == len(first) + complete + 1 and "EOFError" in errors[0]["error"]


def test_malformed_lines_non_utf8_and_oversized_documents_are_errors_with_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl(0).encode() + b"{broken\n" + b'{"text": 3}\n' + b'{"text": "caf\xe9"}\n\n'
                     + json.dumps({"text": "x" * 500}).encode() + b"\n" + jsonl(5).encode())
    docs, errors = read_all(path, max_doc_bytes=100)
    assert [d["id"] for d in docs] == ["d0", "d5"]
    assert [e["line"] for e in errors] == [2, 3, 4, 6]
    assert "non-UTF-8" in errors[2]["error"] and "oversized" in errors[3]["error"]
    assert docs[1]["meta"]["origin"] == "in.jsonl:7"


def test_blocks_cover_every_line_once_with_line_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BLOCK_BYTES", 200)
    monkeypatch.setattr(readers, "GZIP_MEMBER_BYTES", 150)
    docs = [{"id": f"d{i}", "text": "t" * (i % 17), "meta": {}} for i in range(100)]
    for name in ("a.jsonl", "a.jsonl.gz"):
        readers.write_jsonl(docs, str(tmp_path / name))
        blocks = readers.index_file(str(tmp_path / name), "jsonl")
        assert len(blocks) > 5
        got = [d for b in blocks for d, _ in readers.read_block(b, "jsonl")]
        assert [d["id"] for d in got] == [d["id"] for d in docs]
        assert [d["meta"]["origin"] for d in got] == [f"{name}:{i + 1}" for i in range(100)]


def test_write_jsonl_is_deterministic_multi_member_gzip(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "GZIP_MEMBER_BYTES", 100)
    docs = [{"id": str(i), "text": "é" * i, "meta": {}} for i in range(50)]
    readers.write_jsonl(docs, str(tmp_path / "a.jsonl.gz"))
    readers.write_jsonl(docs, str(tmp_path / "b.jsonl.gz"))
    a = (tmp_path / "a.jsonl.gz").read_bytes()
    assert a == (tmp_path / "b.jsonl.gz").read_bytes() and a.count(b"\x1f\x8b\x08") > 5
    assert list(readers.read_jsonl(str(tmp_path / "a.jsonl.gz"))) == docs


def test_split_is_balanced_where_whole_files_are_not(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BLOCK_BYTES", 4096)
    sizes = [400_000, 40_000, 40_000, 40_000]  # one big file and three small ones
    blocks = []
    for i, size in enumerate(sizes):
        p = tmp_path / f"f{i}.jsonl"
        line = jsonl(0)
        p.write_text(line * (size // len(line)))
        blocks += readers.index_file(str(p), "jsonl")
    owner = pipeline.split_blocks(blocks, 4)
    per_task = [sum(b["length"] for b, o in zip(blocks, owner) if o == t) for t in range(4)]
    mean = sum(per_task) / 4
    assert max(per_task) - min(per_task) <= 2 * 4096 + 100  # within a block or two of each other
    assert max(sizes) / mean > 3  # splitting by whole file would leave one task 3x the mean


def record(headers, block):
    head = "WARC/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return gzip.compress(head.encode() + f"Content-Length: {len(block)}\r\n\r\n".encode() + block + b"\r\n\r\n")


def http(body, content_type="text/html; charset=utf-8", extra=""):
    return f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n{extra}\r\n".encode() + body


def test_warc_reader_on_synthetic_records(tmp_path):
    page = "<html><head><title>T</title><script>var x;</script></head><body><nav>menu</nav>" \
           "<p>Hello <b>world</b> &amp; more.</p><p>Second line.</p></body></html>"
    chunked = b"5\r\nHello\r\n6\r\n world\r\n0\r\n\r\n"
    parts = [
        record({"WARC-Type": "warcinfo"}, b"software: test\r\n"),
        record({"WARC-Type": "request", "WARC-Target-URI": "http://a.example/"}, b"GET / HTTP/1.1\r\n\r\n"),
        record({"WARC-Type": "response", "WARC-Target-URI": "http://a.example/", "WARC-Record-ID": "<urn:uuid:1>"},
               http(page.encode())),
        record({"WARC-Type": "response", "WARC-Record-ID": "<urn:uuid:2>"},
               http("café".encode("latin-1"), "text/html; charset=ISO-8859-1")),
        record({"WARC-Type": "response", "WARC-Record-ID": "<urn:uuid:3>"}, http(b"\x89PNG", "image/png")),
        record({"WARC-Type": "response", "WARC-Record-ID": "<urn:uuid:4>"},
               http(chunked, "text/html", "Transfer-Encoding: chunked\r\n")),
        record({"WARC-Type": "response", "WARC-Record-ID": "<urn:uuid:5>"}, http(b"caf\xe9")),  # not UTF-8
    ]
    path = tmp_path / "t.warc.gz"
    path.write_bytes(b"".join(parts))
    docs, errors = read_all(path, "warc")
    assert [d["id"] for d in docs] == ["urn:uuid:1", "urn:uuid:2", "urn:uuid:3", "urn:uuid:4"]
    assert docs[1]["text"] == "café" and docs[3]["text"] == "Hello world"
    assert docs[0]["meta"]["url"] == "http://a.example/" and docs[2]["meta"]["content_type"] == "image/png"
    assert len(errors) == 1 and errors[0]["record"] == 6 and "utf-8" in errors[0]["error"]
    assert warc.extract(docs[2]) == "not_html"
    assert warc.extract(docs[0], extractor="html.parser") is None
    assert docs[0]["text"] == "T\nHello world & more.\nSecond line."  # no script, no nav


def not_installed(monkeypatch, package):
    """Import `package` (and its submodules) as if it were not installed."""
    for name in [m for m in sys.modules if m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)


@pytest.fixture
def broken_trafilatura(tmp_path, monkeypatch):
    """A trafilatura that is installed but fails to import, as it does with lxml >= 5.2 and no
    lxml_html_clean; nothing is installed, the fake package shadows any real one."""
    (tmp_path / "trafilatura").mkdir()
    (tmp_path / "trafilatura" / "__init__.py").write_text(
        'raise ImportError("lxml.html.clean module is now a separate project lxml_html_clean")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] == "trafilatura"]:
        monkeypatch.delitem(sys.modules, name)
    not_installed(monkeypatch, "resiliparse")
    warc.extractors.cache_clear()
    yield
    warc.extractors.cache_clear()


def test_an_extractor_that_fails_to_import_is_reported_with_its_cause(broken_trafilatura):
    assert warc.extractors()["trafilatura"] == "lxml.html.clean module is now a separate project lxml_html_clean"
    page = {"id": 1, "text": "<p>Some text.</p>", "meta": {"content_type": "text/html"}}
    with pytest.raises(ImportError, match="extractor='trafilatura': lxml.html.clean module .* lxml_html_clean"):
        warc.extract(dict(page), extractor="trafilatura")
    with pytest.warns(UserWarning, match="trafilatura is installed but does not import .*lxml_html_clean.*"
                                         "using html.parser"):
        assert warc.extract(page) is None and page["meta"]["extractor"] == "html.parser"


def test_trafilatura_text_of_a_page_does_not_depend_on_the_pages_before():
    # trafilatura's deduplicate=True drops a block its process saw 3 times before; prep clears that per page
    pytest.importorskip("trafilatura")
    if warc.extractors()["trafilatura"]:
        pytest.skip(warc.extractors()["trafilatura"])
    page = "<html><body><article>" + "".join(
        f"<p>Paragraph {i} of a long article, with enough words to pass the length check of the extractor.</p>"
        for i in range(8)) + "</article></body></html>"
    assert len({warc.html_to_text(page) for _ in range(4)}) == 1


def test_a_missing_extractor_is_named(monkeypatch):
    not_installed(monkeypatch, "resiliparse")
    warc.extractors.cache_clear()
    assert warc.extractors()["resiliparse"] == "not installed"
    with pytest.raises(ImportError, match="extractor='resiliparse': not installed .see requirements-prep.txt"):
        warc.extract({"id": 1, "text": "<p>x</p>", "meta": {}}, extractor="resiliparse")
    warc.extractors.cache_clear()


CC = os.path.join(SHARED_DATA, "common_crawl")


@pytest.mark.skipif(not os.path.isdir(CC), reason="no ../shared/data/common_crawl")
@pytest.mark.parametrize("name,fmt,record_type", [("whirlwind.warc.gz", "warc", "response"),
                                                  ("dolma-wget-sample-0000.warc.gz", "warc", "response"),
                                                  ("whirlwind.warc.wet.gz", "wet", "conversion")])
def test_warc_reader_agrees_with_warcio(name, fmt, record_type):
    ArchiveIterator = pytest.importorskip("warcio.archiveiterator").ArchiveIterator
    docs, errors = read_all(os.path.join(CC, name), fmt)
    with open(os.path.join(CC, name), "rb") as f:
        ref = [(r.rec_headers.get_header("WARC-Record-ID").strip("<>"), r.content_stream().read(),
                r.http_headers.get_header("Content-Type", "") if r.http_headers else "")
               for r in ArchiveIterator(f) if r.rec_type == record_type]
    assert not errors and [d["id"] for d in docs] == [i for i, _, _ in ref]
    for d, (_, body, content_type) in zip(docs, ref):  # the same payload bytes as warcio's
        if fmt == "wet":
            assert d["text"] == body.decode("utf-8")
        elif d["meta"]["content_type"] in warc.HTML_TYPES:
            assert d["text"] == warc.decode_html(body, content_type)
