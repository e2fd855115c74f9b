import gzip
import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from prep import readers, shards, tokenizer


def test_tree_reader_keeps_text_and_records_unreadable_files(tmp_path):
    (tmp_path / "a.py").write_text("print('hé')\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# title\n")
    (tmp_path / "sub" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    errors = []
    docs = list(readers.read_tree(str(tmp_path), errors=errors))
    assert [d["id"] for d in docs] == ["a.py", "sub/b.md"]
    assert docs[0]["text"] == "print('hé')\n" and docs[0]["meta"]["bytes"] == 13
    assert len(errors) == 1 and errors[0]["file"].endswith("latin1.txt") and "UnicodeDecodeError" in errors[0]["error"]


def test_jsonl_round_trip_gzip_and_malformed_lines(tmp_path):
    docs = [{"id": str(i), "text": f"doc {i} ✓", "meta": {"k": i}} for i in range(5)]
    path = str(tmp_path / "docs.jsonl.gz")
    assert readers.write_jsonl(docs, path) == 5
    with gzip.open(path, "rt") as f:  # really gzip
        assert json.loads(f.readline())["text"] == "doc 0 ✓"
    assert list(readers.read_jsonl(path)) == docs
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": 3}\nnot json\n{"text": "\xff"}\n')
    errors = []
    kept = list(readers.read_jsonl(str(bad), errors))
    assert [d["text"] for d in kept] == ["ok"] and kept[0]["id"] == "bad.jsonl:1"
    assert [e["line"] for e in errors] == [2, 3, 4]
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        list(readers.read_jsonl(str(bad)))


ROUND_TRIP = ["def f(x):\n\treturn x ** 2  # square\n",
              "Unicode: naïve café, 日本語, Ελληνικά, emoji 🙂👍🏽, RTL שלום\r\n",
              "   leading and trailing spaces   \n\n\n",
              "numbers 1234567890 and 3.14159e-10, 0xDEADBEEF",
              "\x00\x01 control \u200b zero-width \ufeff BOM"]


@pytest.fixture(scope="module")
def tok():
    texts = [open(__file__, encoding="utf-8").read()] * 3 + ROUND_TRIP
    return tokenizer.train_tokenizer(texts, 400, min_frequency=1)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_tokenizer_splits_digits_and_knows_special_tokens(tok):
    pieces = tok.encode("x = 2024", add_special_tokens=False).tokens
    assert pieces[-4:] == ["2", "0", "2", "4"]
    assert [tok.token_to_id(t) for t in tokenizer.SPECIAL_TOKENS] == list(range(len(tokenizer.SPECIAL_TOKENS)))
    ids = tok.encode("<|user|>hi<|end|>", add_special_tokens=False).ids
    assert ids[0] == tokenizer.SPECIAL_TOKENS.index("<|user|>")


def test_tokenize_to_shards_writes_format_and_stable_split(tmp_path, tok):
    tok.save(str(tmp_path / "tok.json"))
    docs = [{"id": f"doc{i}", "text": ROUND_TRIP[i % 5] * (i + 1), "meta": {}} for i in range(40)]
    readers.write_jsonl(docs, str(tmp_path / "docs.jsonl"))
    stats = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        stats[workers] = shards.tokenize_to_shards([str(tmp_path / "docs.jsonl")], str(tmp_path / "tok.json"),
                                                   str(out), workers=workers, val_fraction=0.2, shard_tokens=500)
    assert stats[1]["train"] == stats[2]["train"] and stats[1]["val"] == stats[2]["val"]  # workers don't matter
    s = stats[1]
    assert s["train"]["documents"] + s["val"]["documents"] == 40 and s["val"]["documents"] > 0
    assert s["train"]["bytes"] + s["val"]["bytes"] == sum(len(d["text"].encode()) for d in docs)
    val_ids = {d["id"] for d in docs if shards.is_val(d["id"], 0.2)}
    assert len(val_ids) == s["val"]["documents"]
    # Shards decode back to the documents, each after a BOS token, in order.
    t = Tokenizer.from_file(str(tmp_path / "out1" / "tokenizer.json"))
    train_docs = [d["text"] for d in docs if d["id"] not in val_ids]
    tokens = []
    for name in s["train"]["shards"]:
        meta = json.loads((tmp_path / "out1" / name.replace(".bin", ".json")).read_text())
        arr = np.fromfile(tmp_path / "out1" / name, dtype=meta["dtype"])
        assert meta["dtype"] == "uint16" and meta["tokens"] == arr.size and meta["vocab_size"] == 400
        tokens.extend(arr.tolist())
    text = t.decode(tokens, skip_special_tokens=False)
    assert text == "".join("<|bos|>" + d for d in train_docs)


def test_malformed_input_lines_are_counted_not_dropped(tmp_path, tok):
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "docs.jsonl").write_text('{"id": "a", "text": "hello"}\n{broken\n{"id": "b", "text": "world"}\n')
    s = shards.tokenize_to_shards([str(tmp_path / "docs.jsonl")], str(tmp_path / "tok.json"), str(tmp_path / "o"),
                                  workers=1, val_fraction=0.0)
    assert s["train"]["documents"] == 2 and s["errored"] == 1 and s["errors"][0]["line"] == 2
