"""python -m prep COMMAND ...

  corpus     --tree DIR|stdlib --out docs.jsonl.gz    documents from a local tree of text/code
  tokenizer  --docs F [F ...] --vocab-size N --out tokenizer.json
  tokenize   --docs F [F ...] --tokenizer tokenizer.json --out DIR [--workers W]
"""
import argparse
import json
import sys
import time

from prep import readers, shards, tokenizer


def cmd_corpus(args):
    root = readers.stdlib_root() if args.tree == "stdlib" else args.tree
    errors = []
    t0 = time.time()
    n = readers.write_jsonl(readers.read_tree(root, tuple(args.suffix), errors), args.out)
    print(f"corpus: {n} documents from {root} -> {args.out} in {time.time() - t0:.1f}s; "
          f"{len(errors)} unreadable files")
    for e in errors[:5]:
        print(f"  unreadable: {e['file']}: {e['error']}")


def cmd_tokenizer(args):
    t0 = time.time()
    docs = [d for p in args.docs for d in readers.read_jsonl(p)]
    total = sum(len(d["text"]) for d in docs)
    tok = tokenizer.train_tokenizer(tokenizer.sample_texts(docs, args.sample_chars, args.seed, total),
                                    args.vocab_size)
    tok.save(args.out)
    held_out = [d["text"] for d in docs[:: max(1, len(docs) // 200)]]
    info = tokenizer.describe(tok, held_out)
    with open(args.out.removesuffix(".json") + ".stats.json", "w") as f:
        json.dump(info, f, indent=1, ensure_ascii=False)
    print(f"tokenizer: vocab {info['vocab_size']}, {info['bytes_per_token']:.2f} bytes/token, trained on "
          f"~{min(total, args.sample_chars) / 1e6:.1f}M of {total / 1e6:.1f}M chars in {time.time() - t0:.1f}s "
          f"-> {args.out}")
    print("  longest tokens:", [t for t in info["longest_tokens"][:5]])


def cmd_tokenize(args):
    s = shards.tokenize_to_shards(args.docs, args.tokenizer, args.out, args.workers, args.val_fraction,
                                  args.shard_tokens)
    print(f"tokenize: train {s['train']['tokens']:,} tokens ({s['train']['documents']} docs, "
          f"{len(s['train']['shards'])} shards), val {s['val']['tokens']:,} tokens ({s['val']['documents']} docs), "
          f"{s['bytes_per_token']:.2f} bytes/token, {s['errored']} errored, {s['seconds']}s with "
          f"{s['workers']} workers -> {args.out}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m prep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("corpus", help="documents from a local tree of text and code files")
    c.add_argument("--tree", required=True, help="a directory, or 'stdlib' for this Python's standard library")
    c.add_argument("--suffix", nargs="+", default=list(readers.TEXT_SUFFIXES))
    c.add_argument("--out", required=True)
    c.set_defaults(fn=cmd_corpus)
    t = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    t.add_argument("--docs", nargs="+", required=True)
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--sample-chars", type=int, default=50_000_000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True)
    t.set_defaults(fn=cmd_tokenizer)
    k = sub.add_parser("tokenize", help="tokenize documents into train/val shards")
    k.add_argument("--docs", nargs="+", required=True)
    k.add_argument("--tokenizer", required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--workers", type=int, default=2)
    k.add_argument("--val-fraction", type=float, default=0.01)
    k.add_argument("--shard-tokens", type=int, default=1 << 24)
    k.set_defaults(fn=cmd_tokenize)
    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
