"""python -m prep COMMAND ...

  run        RECIPE.toml [--out DIR] [--tasks N] [--workers W] [--task-id K] [--set name.key=value]
             run a recipe: N tasks, W at a time locally, or task K of N (a Slurm array task;
             N and K default to SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_ID)
  plan       RECIPE.toml [--tasks N]           print the stages a recipe compiles to
  inspect    OUT [--samples K] [--grep REGEX [--tokens]]  removal rates, samples, top domains, search
  diff       OUT_A OUT_B                       what differs between two runs' manifests
  classifier --positive F.. --negative F.. --out model.npz   train the quality classifier
  lm         --docs F.. --out lm.json.gz [--calibrate F..]   train the n-gram LM (perplexity)
  tokenizer  --docs F [F ...] --vocab-size N --out tokenizer.json
  tokenize   --docs F [F ...] --tokenizer tokenizer.json --out DIR [--workers W]

Input files for classifier/lm are JSONL(.gz), or plain text with one document per line.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from prep import inspection, pipeline, quality, readers, shards, tokenizer
from prep.recipe import compile_stages, load_recipe


def cmd_run(args):
    recipe = load_recipe(args.recipe, args.set)
    out = args.out or recipe["output"]["dir"]
    if not out:
        sys.exit(f"error: {args.recipe}: no output directory: set [output] dir or pass --out")
    if os.path.exists(out) and not os.path.isdir(out):
        sys.exit(f"error: --out {out}: a file, not a directory")
    t0 = time.time()
    with open(args.recipe) as f:
        text = f.read()
    print(f"prep run {args.recipe}: {args.tasks} tasks, " +
          (f"task {args.task_id}" if args.task_id is not None else f"{args.workers} workers") + f" -> {out}")
    r = pipeline.run(recipe, out, args.tasks, args.workers, args.task_id, text)
    if os.path.exists(os.path.join(out, "stats.json")):
        stats = readers.read_json(os.path.join(out, "stats.json"))
        stages = {n: s for n, s in stats["stages"].items() if isinstance(s, dict) and "steps" in s}
        first, last = next(iter(stages.values())), list(stages.values())[-1]
        print(f"done in {time.time() - t0:.1f}s: {first['in']:,} documents in, {last['kept']:,} out, "
              f"{sum(s['errored'] for s in stages.values())} errored; {first['in'] / (time.time() - t0):.0f} docs/s "
              f"overall. `python -m prep inspect {out}` for details")
        for name, s in stages.items():
            if s["kept"] == 0:  # a run that makes nothing has failed
                sys.exit(f"error: stage {name} kept 0 of {s['in']} documents ({s['errored']} errored): "
                         f"`python -m prep inspect {out}` says why")
    tok_stats = os.path.join(r.tokens, "stats.json")
    if os.path.exists(tok_stats):
        s = readers.read_json(tok_stats)
        print(f"tokens: train {s['train']['tokens']:,} ({s['train']['documents']:,} docs), val "
              f"{s['val']['tokens']:,} ({s['val']['documents']:,} docs), {s['bytes_per_token']:.2f} bytes/token")
        if not s["train"]["tokens"]:
            sys.exit(f"error: stage tokenize wrote no training token ({s['val']['documents']} documents to validation)")
    return r


def cmd_plan(args):
    for s in compile_stages(load_recipe(args.recipe, args.set), args.tasks):
        steps = [st["name"] for st in s.get("steps", [])]
        extra = [s["dedup"]] if s.get("dedup") else []
        print(f"{s['name']:<16} {s['tasks']:>4} task(s)  {' '.join(extra + steps)}")


def _texts(paths):
    for p in paths:
        if ".jsonl" in p:
            yield from (d["text"] for d in readers.read_jsonl(p))
        else:
            with readers.open_text(p) as f:
                yield from (line.strip() for line in f if line.strip())


def cmd_classifier(args):
    pos, neg = list(_texts(args.positive)), list(_texts(args.negative))
    # every 10th document of each class is held out for the accuracy figure
    model = quality.train_classifier(
        [t for i, t in enumerate(pos) if i % 10], [t for i, t in enumerate(neg) if i % 10], epochs=args.epochs)
    quality.save_classifier(model, args.out)
    right = sum(quality.classifier_score(model, t) >= 0.5 for t in pos[::10]) + \
        sum(quality.classifier_score(model, t) < 0.5 for t in neg[::10])
    n = len(pos[::10]) + len(neg[::10])
    print(f"classifier: {len(pos)} positive, {len(neg)} negative documents; held-out accuracy "
          f"{right / max(n, 1):.3f} on {n} -> {args.out}")


def cmd_lm(args):
    texts = list(_texts(args.docs))
    lm = quality.KneserNey.train(texts, args.order)
    calib = list(_texts(args.calibrate)) if args.calibrate else texts[::10]
    ppl = [lm.perplexity(t) for t in calib]
    cutoffs = [float(np.percentile(ppl, q)) for q in quality.PERPLEXITY_PERCENTILES]
    lm.save(args.out, cutoffs)
    print(f"lm: order {args.order}, {lm.vocab_size:,} words from {len(texts)} documents; perplexity cutoffs "
          f"(33rd, 66th percentile of {len(calib)} docs) {cutoffs[0]:.0f}, {cutoffs[1]:.0f} -> {args.out}")


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
    print("  longest tokens:", info["longest_tokens"][:5])


def cmd_tokenize(args):
    s = shards.tokenize_to_shards(args.docs, args.tokenizer, args.out, args.workers, args.val_fraction,
                                  args.shard_tokens)
    print(f"tokenize: train {s['train']['tokens']:,} tokens ({s['train']['documents']} docs, "
          f"{len(s['train']['shards'])} shards), val {s['val']['tokens']:,} tokens ({s['val']['documents']} docs), "
          f"{s['bytes_per_token']:.2f} bytes/token, {s['errored']} errored, {s['seconds']}s with "
          f"{s['workers']} workers -> {args.out}")


def _env_int(*names):
    for n in names:
        if os.environ.get(n):
            return int(os.environ[n])
    return None


def positive(text):
    """argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m prep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a recipe")
    r.add_argument("recipe")
    r.add_argument("--out", help="output directory (default: the recipe's [output] dir)")
    r.add_argument("--tasks", type=positive, default=_env_int("SLURM_ARRAY_TASK_COUNT", "WORLD_SIZE") or 1)
    r.add_argument("--workers", type=positive, default=1, help="tasks run at a time locally")
    r.add_argument("--task-id", type=int, default=_env_int("SLURM_ARRAY_TASK_ID", "RANK"),
                   help="run only this task of each stage (a Slurm array task)")
    r.add_argument("--set", action="append", default=[], help="override: input.key=value or step_name.key=value")
    r.set_defaults(fn=cmd_run)
    pl = sub.add_parser("plan", help="print the stages of a recipe")
    pl.add_argument("recipe")
    pl.add_argument("--tasks", type=positive, default=1)
    pl.add_argument("--set", action="append", default=[])
    pl.set_defaults(fn=cmd_plan)
    i = sub.add_parser("inspect", help="what a run kept and removed")
    i.add_argument("out")
    i.add_argument("--samples", type=int, default=3)
    i.add_argument("--grep", help="a regular expression to search the output documents for")
    i.add_argument("--tokens", action="store_true", help="--grep the decoded token shards, not the documents")
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(fn=lambda a: inspection.inspect(a.out, a.samples, a.grep, a.seed, tokens=a.tokens))
    d = sub.add_parser("diff", help="what differs between two runs (recipe, code, inputs, outputs)")
    d.add_argument("a")
    d.add_argument("b")
    d.set_defaults(fn=lambda a: inspection.diff(a.a, a.b))
    c = sub.add_parser("classifier", help="train the fastText-style quality classifier")
    c.add_argument("--positive", nargs="+", required=True)
    c.add_argument("--negative", nargs="+", required=True)
    c.add_argument("--epochs", type=int, default=5)
    c.add_argument("--out", required=True)
    c.set_defaults(fn=cmd_classifier)
    m = sub.add_parser("lm", help="train the Kneser-Ney n-gram LM for perplexity filtering")
    m.add_argument("--docs", nargs="+", required=True)
    m.add_argument("--calibrate", nargs="+", help="documents whose perplexity percentiles set the buckets")
    m.add_argument("--order", type=int, default=quality.KN_ORDER)
    m.add_argument("--out", required=True)
    m.set_defaults(fn=cmd_lm)
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
    if args.command == "run" and args.task_id is not None and not 0 <= args.task_id < args.tasks:
        p.error(f"--task-id {args.task_id} is outside 0..{args.tasks - 1} (--tasks {args.tasks})")
    try:
        args.fn(args)
    except (ValueError, OSError, ImportError) as e:  # bad input or a missing library: one line naming it
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    sys.exit(main())
