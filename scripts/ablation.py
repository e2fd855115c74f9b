"""A data ablation: which corpus makes the better model? FineWeb's method (Penedo et al.
2024): train the same small model with the same tokenizer, token budget and seeds on each
corpus, evaluate both on the same benchmarks during training, and compare the curves.

    python scripts/ablation.py [--steps 300] [--seeds 0 1] [--max-mb 6] [--out runs/ablation]
                               [--tasks name=path,...]

The two corpora need no download: Python code (this interpreter's standard library) against
English prose (../shared/data/text and C4 sample when present, else the standard library's
docstrings). Benchmarks default to ../shared/data/eval (HellaSwag, ARC-Easy, PIQA,
Winogrande); without them only the bits per byte are compared. Run from the repository
root; configs/ablation.toml holds the model and schedule. Prints, per task, both curves side
by side, the signal report of each corpus across seeds, and each model's bits per byte on
both validation sets.
"""
import argparse
import ast
import json
import os
import random
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join("..", "shared", "data")  # relative to ROOT, where main() works
BENCHMARKS = {"hellaswag": "hellaswag_val_1000.jsonl", "arc_easy": "arc_easy_test.jsonl", "piqa": "piqa_valid.jsonl",
              "winogrande": "winogrande_dev.jsonl"}


def code_docs():
    """Every readable .py file of this interpreter's standard library."""
    from prep import readers
    return (doc["text"] for doc in readers.read_tree(readers.stdlib_root(), (".py",)))


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def prose_docs():
    """English prose: Wikipedia articles (one a line), C4 pages and three books; without
    ../shared/data, the docstrings of the standard library."""
    text_dir = os.path.join(SHARED, "text")
    if not os.path.isdir(text_dir):
        for code in code_docs():
            try:
                tree = ast.parse(code)
            except (SyntaxError, ValueError):
                continue
            nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))]
            text = "\n\n".join(d for n in nodes if (d := ast.get_docstring(n)) and len(d) > 200)
            if text:
                yield text
        return
    yield from (line for line in open(os.path.join(text_dir, "wiki_demo.txt"), encoding="utf-8") if line.strip())
    c4 = os.path.join(SHARED, "common_crawl", "c4_demo.jsonl")
    if os.path.exists(c4):
        yield from (json.loads(line)["text"] for line in open(c4, encoding="utf-8"))
    for name in ("kjv_bible.txt", "tinyshakespeare.txt", "alice29.txt"):
        if os.path.exists(os.path.join(text_dir, name)):
            yield read(os.path.join(text_dir, name))


def write_corpus(docs, path, max_bytes, seed=0):
    """A seeded random sample of up to max_bytes as prep's JSONL, in passages of at most 4 KB
    on both sides: whole books and 200 KB source files would otherwise make the split into
    train and validation documents lumpy."""
    docs = [text[i:i + 4096] for text in docs for i in range(0, len(text), 4096)]
    random.Random(seed).shuffle(docs)
    total = 0
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            if total >= max_bytes:
                break
            total += len(text.encode())
            f.write(json.dumps({"id": f"{os.path.basename(path)}:{i}", "text": text, "meta": {}}) + "\n")
    print(f"{path}: {total / 1e6:.1f} MB")


def run(cmd):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def curves(run_dir):
    """{"eval/task_metric": [(step, score)]} from a run's metrics.jsonl."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for record in map(json.loads, f):
            for key, value in record.items():
                if key.startswith("eval/"):
                    out.setdefault(key, []).append((record["step"], value))
    return out


def side_by_side(runs, corpora, key):
    """Rows of step, then the score of each corpus (mean over seeds)."""
    steps = sorted({s for c in corpora for r in runs[c] for s, _ in r.get(key, [])})
    lines = [f"{key}\n{'step':>6} " + " ".join(f"{c:>8}" for c in corpora)]
    for step in steps:
        cells = [statistics.fmean(v for r in runs[c] for s, v in r.get(key, []) if s == step) for c in corpora]
        lines.append(f"{step:>6} " + " ".join(f"{v:>8.3f}" for v in cells))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--max-mb", type=float, default=6.0, help="each corpus is cut to this size")
    p.add_argument("--tasks", help="eval.py task spec (default: the ../shared/data benchmarks)")
    args = p.parse_args()
    import checkpoint
    import eval as evaluation
    from config import load_config
    os.chdir(ROOT)
    out = args.out
    os.makedirs(out, exist_ok=True)
    corpora = ["code", "prose"]
    shared_eval = os.path.join(SHARED, "eval")
    tasks = args.tasks or ",".join(f"{name}={os.path.join(shared_eval, f)}" for name, f in BENCHMARKS.items()
                                   if os.path.exists(os.path.join(shared_eval, f)))

    # 1. Corpora of equal size, one tokenizer trained on both (a fair vocabulary for each).
    write_corpus(code_docs(), f"{out}/code.jsonl", args.max_mb * 1e6)
    write_corpus(prose_docs(), f"{out}/prose.jsonl", args.max_mb * 1e6)
    run([sys.executable, "-m", "prep", "tokenizer", "--docs", f"{out}/code.jsonl", f"{out}/prose.jsonl",
         "--vocab-size", "4096", "--sample-chars", "4000000", "--out", f"{out}/tokenizer.json"])
    for c in corpora:
        run([sys.executable, "-m", "prep", "tokenize", "--docs", f"{out}/{c}.jsonl", "--tokenizer",
             f"{out}/tokenizer.json", "--out", f"{out}/tokens_{c}", "--workers", "2", "--val-fraction", "0.05"])

    # 2. The same model, steps and seeds on each corpus; benchmarks every eval.every steps.
    for c in corpora:
        for seed in args.seeds:
            sets = [f"data.train={out}/tokens_{c}/train_*.bin", f"data.val={out}/tokens_{c}/val_*.bin",
                    f"log.dir={out}/{c}_seed{seed}", f"data.seed={seed}", f"optim.steps={args.steps}",
                    f"eval.tasks={tasks}", f"eval.every={max(1, args.steps // 6) if tasks else 0}"]
            run([sys.executable, "train.py", "--config", "configs/ablation.toml", "--start-over"]
                + [arg for s in sets for arg in ("--set", s)])

    # 3. The curves side by side, each corpus's signal report, and bits per byte across domains.
    ecfg = load_config("configs/ablation.toml").eval
    metric = evaluation.HEADLINE[ecfg.mode]
    runs = {c: [curves(f"{out}/{c}_seed{s}") for s in args.seeds] for c in corpora}
    for key in sorted(runs["code"][0]):
        if key.endswith("_" + metric):
            print("\n" + side_by_side(runs, corpora, key))
    for c in corpora if tasks else []:
        report = {}
        for t in evaluation.load_tasks(tasks, ecfg.limit):
            random_score = statistics.fmean(1 / len(ex.choices) for ex in t.examples)
            seeds = {s: r[f"eval/{t.name}_{metric}"] for s, r in zip(args.seeds, runs[c])}
            report[t.name] = evaluation.signal_report(seeds, random_score, len(t.examples))
        print(f"\nsignal report, {c} ({len(args.seeds)} seeds)\n" + evaluation.signal_table(report))
    print(f"\nbits per byte on each validation set (rows: trained on)\n{'':>6} " + " ".join(f"{c:>8}" for c in corpora))
    for c in corpora:
        _, model = checkpoint.load_model(checkpoint.step_dirs(f"{out}/{c}_seed{args.seeds[0]}/checkpoints")[-1])
        bpb = [evaluation.shards_bpb(model, f"{out}/tokens_{v}/val_*.bin", batches=8)["bpb"] for v in corpora]
        print(f"{c:>6} " + " ".join(f"{b:>8.3f}" for b in bpb))


if __name__ == "__main__":
    main()
