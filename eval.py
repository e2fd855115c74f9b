"""eval.py — evaluation: multiple-choice benchmarks, perplexity and bits per byte, in-training monitoring, and a
signal report of which benchmarks to trust (across seeds: scripts/ablation.py prints it from the in-training curves).

    python eval.py --checkpoint DIR --tasks hellaswag=hs.jsonl,arc_easy=arc.jsonl [--mode norm|pmi|letter]
                   [--shots 5] [--limit 500] [--out results.json] [--report runs/x/report.md]
    python eval.py --checkpoint DIR --text book.txt --shards "tokens/val_*.bin"     # perplexity, bits per byte

A multiple-choice question is scored by the log-likelihood the model gives each answer after the prompt
(lm-eval-harness's `loglikelihood` requests), in one of two formulations (OLMES, Gu et al. 2024): cloze, where
the answer text continues the prompt, which is what gives small models a signal; and multiple-choice format,
where the options are listed as A/B/C/D and the letter is scored, which models only learn to use late in
training and at larger scale (OLMES; the FineWeb ablations use cloze for the same reason).

Models come from checkpoint.py (a checkpoint directory, or in-training weights); eval.py
never imports train.py, which imports it.
"""
import argparse
import contextlib
import csv
import functools
import glob
import io
import json
import math
import os
import random
import re
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import checkpoint
import data
from config import number
from prep.tokenizer import BOS  # every training document starts with it

LETTERS = "ABCDEFGHIJ"
UNCONDITIONAL = "Answer:"  # PMI's answer-only context (Brown et al. 2020, GPT-3, section 2.4)
MODES = {"norm": ("acc", "acc_token", "acc_norm"),  # cloze, scored three ways
         "pmi": ("acc", "acc_token", "acc_norm", "acc_pmi"),
         "letter": ("acc",)}
HEADLINE = {"norm": "acc_norm", "pmi": "acc_pmi", "letter": "acc"}
MMLU_COLUMNS = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]


# ----------------------------------------------------------------------------------------
# Tasks: each published format -> one record (context, choices, gold), plus a few-shot pool

@dataclass
class Example:
    """A multiple-choice question. Cloze: choice i is scored as the continuation " " + choice after `context`. Partial
    (Winogrande, suffix set): choice i completes `context`, and `suffix` is the continuation scored for every choice."""
    context: str
    choices: list
    gold: int
    question: str = ""         # the question a letter prompt shows; "" : context
    suffix: str | None = None
    group: str = ""            # MMLU's subject: few-shot examples come from the same one


@dataclass
class Task:
    name: str
    examples: list
    pool: list                 # few-shot examples: MMLU's dev split, else the examples (minus the one asked)


class TaskFormatError(ValueError):
    pass


def need(row, *keys):
    if not isinstance(row, dict):
        raise TaskFormatError(f"expected a JSON object, got {type(row).__name__}")
    missing = [k for k in keys if k not in row]
    if missing:
        raise TaskFormatError(f"missing field {missing[0]!r} (this format needs {', '.join(keys)})")
    return [row[k] for k in keys]


def qa(question, choices, gold, group=""):
    """lm-eval-harness's cloze prompt for ARC, PIQA, MMLU (cloze): 'Question: q\\nAnswer:' + ' ' + answer."""
    return Example(f"Question: {question}\nAnswer:", list(choices), gold, f"Question: {question}", group=group)


def hellaswag_clean(text):
    """lm-eval-harness's cleanup of HellaSwag's WikiHow artifacts ([title], [step], ...)."""
    return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")


def hellaswag(row):
    """Zellers et al. 2019, rowanz/hellaswag jsonl: ctx_a, ctx_b, activity_label, endings, label."""
    ctx_a, ctx_b, activity, endings, label = need(row, "ctx_a", "ctx_b", "activity_label", "endings", "label")
    context = hellaswag_clean(f"{activity}: {ctx_a} {ctx_b.capitalize()}")
    return Example(context, [hellaswag_clean(e) for e in endings], index(label))


def ai2_question(row):
    """(stem, choice texts, gold) from the AI2 layout of ARC, OpenBookQA and CommonsenseQA,
    {"question": {"stem", "choices": [{"label", "text"}]}, "answerKey"}, or the Hugging Face
    datasets one, {"question" | "question_stem", "choices": {"label": [...], "text": [...]}, "answerKey"}."""
    answer = str(need(row, "answerKey")[0]).strip()
    if isinstance(row.get("question"), dict):
        stem, choices = need(row["question"], "stem", "choices")
        labels, texts = zip(*(need(c, "label", "text") for c in choices)) if choices else ((), ())
    else:
        stem = row["question_stem"] if "question_stem" in row else need(row, "question")[0]
        labels, texts = need(need(row, "choices")[0], "label", "text")
    labels = [str(label).strip() for label in labels]
    if answer not in labels:
        raise TaskFormatError(f"answerKey {answer!r} is not one of the choice labels {labels}")
    return stem, list(texts), labels.index(answer)


def question_answer(row):
    """ARC and CommonsenseQA: 'Question: stem\\nAnswer:' + ' ' + answer."""
    return qa(*ai2_question(row))


def openbookqa(row):
    """lm-eval-harness scores the answer right after the bare stem, which it completes."""
    return Example(*ai2_question(row))


def piqa(row):
    """Bisk et al. 2020: goal, sol1, sol2; the label comes from the row or the -labels.lst file."""
    goal, sol1, sol2, label = need(row, "goal", "sol1", "sol2", "label")
    return qa(goal, [sol1, sol2], index(label))


def winogrande(row):
    """Partial evaluation (Trinh & Le 2018; GPT-3; lm-eval-harness): each option fills the blank and the
    model scores the rest of the sentence after it, the same words for every option, so how likely the
    option itself is does not decide. Reads the original format (sentence with '_', option1, option2,
    answer '1'/'2') and the schema layout of llm-foundry's export (context_options, continuation, gold)."""
    if "context_options" in row:
        options, continuation, gold = need(row, "context_options", "continuation", "gold")
        cut = os.path.commonprefix(options).rfind(" ") + 1  # the blank starts after the last shared space
        context, choices, suffix = options[0][:cut], [o[cut:] for o in options], " " + continuation
    else:
        sentence, option1, option2, answer = need(row, "sentence", "option1", "option2", "answer")
        if "_" not in sentence:
            raise TaskFormatError("sentence has no '_' blank")
        context, suffix = sentence.split("_", 1)
        choices, gold = [option1, option2], int(answer) - 1
    return Example(context, choices, gold, question=f"{context}_{suffix}", suffix=suffix)


def generic(row):
    """The format for custom tasks: {"context": str, "choices": [str, ...], "gold": int}.
    "query" stands for "context", as in llm-foundry's and lighteval's exports."""
    if "query" in row and "context" not in row:
        row = {**row, "context": row["query"]}
    context, choices, gold = need(row, "context", "choices", "gold")
    if not isinstance(choices, list):
        raise TaskFormatError(f"choices must be a list of texts, got {type(choices).__name__}")
    return Example(context, choices, index(gold))


def index(value):
    """An answer index from an int or a string of digits; never a truncated float."""
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        raise TaskFormatError(f"gold answer {value!r} is not a whole number")
    return int(value)


def mmlu(row):
    """Hendrycks et al. 2021: question, four choices, answer as a letter (original CSVs) or an index."""
    question, *choices, answer = need(row, *MMLU_COLUMNS)
    gold = LETTERS.index(answer.strip()) if answer.strip() in ("A", "B", "C", "D") else index(answer.strip())
    return qa(question, choices, gold, group=row.get("subject", ""))


PARSERS = {"hellaswag": hellaswag, "arc_easy": question_answer, "arc_challenge": question_answer, "piqa": piqa,
           "openbookqa": openbookqa, "commonsenseqa": question_answer, "winogrande": winogrande, "mmlu": mmlu}


def parse_row(name, row, where):
    """An Example from one row, or a TaskFormatError naming the file and line. A row already
    in the generic format loads under any task name (preprocessed exports)."""
    is_generic = isinstance(row, dict) and {"choices", "gold"} <= row.keys() and ("context" in row or "query" in row)
    try:
        ex = generic(row) if is_generic else PARSERS.get(name, generic)(row)
        if not isinstance(ex.context, str) or len(ex.choices) < 2 or not all(isinstance(c, str) for c in ex.choices):
            raise TaskFormatError("expected a text context and at least two text choices")
        if not 0 <= ex.gold < len(ex.choices):
            raise TaskFormatError(f"gold answer {ex.gold} is out of range for {len(ex.choices)} choices")
        return ex
    except (ValueError, TypeError, AttributeError) as e:
        raise TaskFormatError(f"{where}: {name}: {e}") from None


def read_jsonl(path):
    for lineno, line in enumerate(data.read_text(path).split("\n"), 1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except ValueError as e:
                raise TaskFormatError(f"{path}:{lineno}: not valid JSON ({e})") from None


def load_task(name, path):
    """A Task from a file in its published format (PARSERS, MMLU's CSVs, or generic JSONL)."""
    if name == "mmlu":
        return load_mmlu(path)
    rows = list(read_jsonl(path))
    labels_path = path.removesuffix(".jsonl") + "-labels.lst"  # PIQA's labels live beside its questions
    if name == "piqa" and os.path.exists(labels_path):
        with open(labels_path) as f:
            labels = [line.strip() for line in f if line.strip()]
        if len(labels) != len(rows):
            raise TaskFormatError(f"{path}: {len(rows)} questions but {len(labels)} labels in its -labels.lst")
        rows = [(n, {**row, "label": label}) for (n, row), label in zip(rows, labels)]
    examples = [parse_row(name, row, f"{path}:{n}") for n, row in rows]
    if not examples:
        raise TaskFormatError(f"{path}: no examples")
    return Task(name, examples, examples)


def read_mmlu_csv(path):
    """Hendrycks et al. 2021's CSVs have no header (question, A, B, C, D, answer letter); Hugging
    Face exports have one (question, choice0..choice3, answer index), in any column order."""
    reader = csv.reader(io.StringIO(data.read_text(path), newline=""))
    rows = [(reader.line_num, cells) for cells in reader]
    columns = MMLU_COLUMNS
    if rows and "question" in rows[0][1]:
        columns, rows = rows[0][1], rows[1:]
    for line, cells in rows:
        if len(cells) != len(columns):
            raise TaskFormatError(f"{path}:{line}: mmlu: {len(cells)} columns, expected {len(columns)} "
                                  f"({', '.join(columns)})")
        subject = re.sub(r"_(test|dev|val)\.csv$", "", os.path.basename(path))
        yield parse_row("mmlu", {**dict(zip(columns, cells)), "subject": subject}, f"{path}:{line}")


def load_mmlu(path):
    """MMLU from one CSV or a directory of them. Few-shot examples come from the subject's dev split, as in the
    paper: the *_dev.csv files in the directory, or dev/X_dev.csv beside test/X_test.csv. The rest are evaluated."""
    files = sorted(glob.glob(os.path.join(path, "**", "*.csv"), recursive=True)) if os.path.isdir(path) else [path]
    tests = [f for f in files if not f.endswith("_dev.csv")]
    twins = [os.path.join(os.path.dirname(os.path.dirname(f)), "dev", os.path.basename(f).replace("_test", "_dev"))
             for f in tests]  # Hendrycks's layout: data/test/X_test.csv, data/dev/X_dev.csv
    devs = [f for f in files if f.endswith("_dev.csv")] or [f for f in twins if os.path.exists(f)]
    if not tests:
        raise TaskFormatError(f"{path}: no MMLU CSV files to evaluate")
    examples = [ex for f in tests for ex in read_mmlu_csv(f)]
    return Task("mmlu", examples, [ex for f in devs for ex in read_mmlu_csv(f)] or examples)


def parse_spec(spec):
    """'hellaswag=a.jsonl,arc_easy=b.jsonl' -> [(name, path)]."""
    pairs = [item.split("=", 1) for item in spec.split(",") if item.strip()]
    if not all(len(p) == 2 and p[0] and p[1] for p in pairs):
        raise TaskFormatError(f"tasks {spec!r}: expected name=path,name=path (names: {', '.join(PARSERS)}; "
                         "any other name reads the generic JSONL format)")
    return [(name.strip(), path.strip()) for name, path in pairs]


def subset(task, limit, seed=0):
    """A fixed random subset of `limit` examples, in file order: files are often sorted
    (MMLU by subject), so the first N would not be representative."""
    if not limit or limit >= len(task.examples):
        return task
    keep = sorted(random.Random(seed).sample(range(len(task.examples)), limit))
    return Task(task.name, [task.examples[i] for i in keep], task.pool)


@functools.lru_cache(maxsize=8)
def load_tasks(spec, limit=0, seed=0):
    """The tasks of a spec, each cut to a subset; cached, so train.py parses them once per run."""
    return tuple(subset(load_task(name, path), limit, seed) for name, path in parse_spec(spec))


# ----------------------------------------------------------------------------------------
# Prompts: the formulation (cloze, partial, letter) and k-shot examples

def fewshot(pool_by_group, ex, k, seed):
    """k solved examples for ex, never ex itself, drawn with a seed made of `seed` and the
    example's own text: the same prompt whatever the subset, order or batch size."""
    candidates = pool_by_group.get(ex.group, [])
    drawn = random.Random(f"{seed}:{ex!r}").sample(candidates, min(k + 1, len(candidates)))
    return [p for p in drawn if p is not ex][:k]


def requests(ex, mode, shots=()):
    """The (context, continuation) pairs to score for ex: one per choice, then for PMI each again after the answer-only
    context. Shots: solved examples in the same formulation, separated by blank lines (lm-eval-harness's default)."""
    prefix = "".join(solved(s, mode) + "\n\n" for s in shots)
    if mode == "letter":  # the multiple-choice format (OLMES; lm-eval-harness's MMLU): options lettered, 'Answer:' last
        if len(ex.choices) > len(LETTERS):
            raise ValueError(f"letter mode supports at most {len(LETTERS)} choices, got {len(ex.choices)}")
        options = "".join(f"\n{LETTERS[j]}. {c}" for j, c in enumerate(ex.choices))
        return [(f"{prefix}{ex.question or ex.context}{options}\nAnswer:", " " + x) for x in LETTERS[:len(ex.choices)]]
    partial = ex.suffix is not None
    reqs = [(prefix + ex.context + c, ex.suffix) if partial else (prefix + ex.context, " " + c) for c in ex.choices]
    if mode == "pmi":
        reqs += [(UNCONDITIONAL, continuation) for _, continuation in reqs]
    return reqs


def solved(ex, mode):
    return "".join(requests(ex, mode)[ex.gold])  # context + continuation


# ----------------------------------------------------------------------------------------
# Scoring: log-likelihoods of continuations, batched, sharing rows where cheap

def context_limit(model):
    cfg = getattr(model, "cfg", None)  # model.py's Transformer, or a transformers model
    return cfg.max_seq_len if cfg is not None else model.config.max_position_embeddings


def encode_requests(tokenizer, reqs):
    """Token ids of (context, continuation) pairs, the context led by BOS as training documents are. The two
    sides are encoded apart (lm-eval-harness encodes the joined text and splits it): the pre-tokenizer cuts
    before a space-led word anyway, and every choice then shares its context's tokens exactly."""
    bos = tokenizer.token_to_id(BOS)
    if bos is None:
        raise ValueError(f"the tokenizer has no {BOS} token (prep/tokenizer.py SPECIAL_TOKENS)")
    texts = list(dict.fromkeys(t for pair in reqs for t in pair))  # contexts repeat once per choice
    ids = {t: e.ids for t, e in zip(texts, tokenizer.encode_batch(texts, add_special_tokens=False))}
    return [([bos] + ids[context], ids[continuation]) for context, continuation in reqs]


def plan_rows(encoded, limit, share_prefix=True):
    """Rows to run: [(input ids, [(request, position of its first target, target ids)])]. A request's row is context +
    continuation minus the last token, cut on the left to the model's context (lm-eval-harness); a continuation longer
    than the context itself (rare: a few PIQA solutions at 256) is scored on its last `limit` tokens. Requests with the
    same row share it: all single-token continuations of a context (letter mode's A, B, C, D) cost one row."""
    rows = {}  # shared row (or, without sharing, request index) -> (row, its requests)
    for i, (context, continuation) in enumerate(encoded):
        if not continuation:
            raise ValueError(f"request {i}: an empty continuation has nothing to score")
        row = tuple((context + continuation)[-(limit + 1):-1])
        targets = continuation[-limit:]
        rows.setdefault(row if share_prefix else i, (row, []))[1].append((i, len(row) - len(targets), targets))
    return list(rows.values())


@torch.no_grad()
def loglikelihoods(model, encoded, batch_size=32, share_prefix=True, autocast=None):
    """[(sum of log P(continuation token), number of tokens)] for encoded requests, with rows
    sorted longest first (padding is then small and memory peaks in the first batch)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = sorted(plan_rows(encoded, context_limit(model), share_prefix), key=lambda r: -len(r[0]))
    out = [None] * len(encoded)
    for b in range(0, len(rows), batch_size):
        batch = rows[b:b + batch_size]
        width = len(batch[0][0])
        ids = torch.tensor([row + (0,) * (width - len(row)) for row, _ in batch])  # right padding: causal, never seen
        with autocast or contextlib.nullcontext():
            logits = model(ids.to(device))
        logits = getattr(logits, "logits", logits)                         # (B, S, vocab)
        sums, who = [], []
        for j, (_, targets) in enumerate(batch):
            for i, start, continuation in targets:
                logprobs = logits[j, start:start + len(continuation)].float().log_softmax(-1)  # (T, vocab)
                sums.append(logprobs.gather(1, torch.tensor(continuation, device=device)[:, None]).sum())
                who.append((i, len(continuation)))
        for (i, n), s in zip(who, torch.stack(sums).tolist()):  # one device sync per batch
            out[i] = (s, n)
    model.train(was_training)
    return out


def loglikelihoods_by_loss(loss_fn, encoded, limit):
    """loglikelihoods through loss_fn(x (1, S), y (1, S)) -> the mean loss over y's targets
    that are not -100 (train.py's parallel forward, in the training layout): each request
    alone, with only its continuation as targets, so its sum is that mean times their count."""
    out = [None] * len(encoded)
    for row, ((i, start, continuation),) in plan_rows(encoded, limit, share_prefix=False):
        y = torch.full((1, len(row)), -100)
        y[0, start:start + len(continuation)] = torch.tensor(continuation)
        out[i] = (-float(loss_fn(torch.tensor([row]), y)) * len(continuation), len(continuation))
    return out


def choice_scores(ex, lls, mode):
    """{metric: a score per choice} from the (sum, tokens) of each request of `requests`.
    Metric names follow lm-eval-harness; the prediction is the highest score."""
    n = len(ex.choices)
    total = [s for s, _ in lls[:n]]
    if mode == "letter":
        return {"acc": total}
    chars = [len(ex.suffix)] * n if ex.suffix is not None else [len(c) for c in ex.choices]
    scores = {"acc": total,                                              # sum of log-likelihood
              "acc_token": [s / t for s, t in lls[:n]],                  # per token (lighteval's token norm)
              "acc_norm": [s / max(c, 1) for s, c in zip(total, chars)]}  # per character (lm-eval's acc_norm)
    if mode == "pmi":  # log P(answer | question) - log P(answer | "Answer:") (Holtzman et al. 2021)
        scores["acc_pmi"] = [s - u for s, (u, _) in zip(total, lls[n:])]
    return scores


def score_task(model, tokenizer, task, mode="norm", shots=0, seed=1234, batch_size=32, autocast=None, scorer=None):
    """choice_scores for every example of the task; scorer: (loss_fn, limit) to score through
    loglikelihoods_by_loss instead of the model's logits."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    pool = {}
    for p in task.pool:
        pool.setdefault(p.group, []).append(p)
    per_example = [requests(ex, mode, fewshot(pool, ex, shots, seed)) for ex in task.examples]
    encoded = encode_requests(tokenizer, [r for reqs in per_example for r in reqs])
    lls = iter(loglikelihoods_by_loss(scorer[0], encoded, scorer[1]) if scorer else
               loglikelihoods(model, encoded, batch_size, autocast=autocast))
    return [choice_scores(ex, [next(lls) for _ in reqs], mode) for ex, reqs in zip(task.examples, per_example)]


def evaluate_task(model, tokenizer, task, mode="norm", shots=0, seed=1234, batch_size=32, autocast=None, scorer=None):
    """{task, mode, shots, n, random, seconds, METRIC, METRIC_stderr for the mode's metrics}."""
    t0 = time.perf_counter()
    scores = score_task(model, tokenizer, task, mode, shots, seed, batch_size, autocast, scorer)
    result = {"task": task.name, "mode": mode, "shots": shots, "n": len(task.examples),
              "random": statistics.fmean(1 / len(ex.choices) for ex in task.examples)}
    for metric in MODES[mode]:
        hits = [s[metric].index(max(s[metric])) == ex.gold for s, ex in zip(scores, task.examples)]
        p, n = sum(hits) / len(hits), len(hits)  # standard error sqrt(p(1-p)/(n-1)): lm-eval's mean_stderr
        result[metric], result[metric + "_stderr"] = p, math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


# ----------------------------------------------------------------------------------------
# Perplexity and bits per byte

@torch.no_grad()
def loss_and_bpb(loss_fn, loader, n_batches, token_bytes, group=None):
    """Mean loss (nats/token) and bits per byte over n_batches of the loader. loss_fn(x, y) is the mean loss
    over the whole batch of the data-parallel group (a model itself, on one process; train.py passes its
    parallel forward); group is the ranks whose loaders split that batch. Bits per byte = loss * tokens /
    (bytes * ln 2), where bytes are the UTF-8 bytes the target tokens stand for: unlike loss per token it
    does not depend on the tokenizer, so runs with different vocabularies compare."""
    device = token_bytes.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss x tokens, tokens, bytes
    for _ in range(n_batches):
        x, y = (t.to(device) for t in loader.next_batch())
        counts = torch.stack([torch.tensor(y.numel(), device=device), token_bytes[y].sum()]).double()
        if group is not None:
            dist.all_reduce(counts, group=group)
        sums += torch.cat([loss_fn(x, y).double().reshape(1) * counts[0], counts])
    loss_sum, n_tokens, n_bytes = sums.tolist()
    return loss_sum / n_tokens, loss_sum / (n_bytes * math.log(2))


def shards_bpb(model, pattern, batches=0, batch_size=8):
    """Loss, perplexity and bits per byte on token shards, every window in order (or the first `batches`)."""
    limit = context_limit(model)
    loader = data.Loader(pattern, limit, batch_size, shuffle=False, key="--shards")
    token_bytes = torch.tensor(data.token_byte_lengths(data.tokenizer_path(pattern)),
                               device=next(model.parameters()).device)
    n = batches or loader.n_windows // batch_size
    loss, bpb = loss_and_bpb(model, loader, n, token_bytes)
    return {"loss": loss, "perplexity": math.exp(loss), "bpb": bpb, "tokens": n * batch_size * limit}


def text_bpb(model, tokenizer, text, batch_size=8, autocast=None):
    """Loss, perplexity and bits per byte of raw text (its UTF-8 bytes): BOS + its tokens in disjoint windows
    of the model's context, each token predicted once (lm-eval-harness's rolling log-likelihood)."""
    ids = [tokenizer.token_to_id(BOS)] + tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) < 2:
        raise ValueError("text_bpb: the text is empty")
    limit = context_limit(model)
    windows = [(ids[s:s + 1], ids[s + 1:s + limit + 1]) for s in range(0, len(ids) - 1, limit)]
    total = sum(s for s, _ in loglikelihoods(model, windows, batch_size, autocast=autocast))
    n_tokens, n_bytes = len(ids) - 1, len(text.encode("utf-8"))
    return {"loss": -total / n_tokens, "perplexity": math.exp(-total / n_tokens),
            "bpb": -total / (n_bytes * math.log(2)), "tokens": n_tokens, "bytes": n_bytes}


# ----------------------------------------------------------------------------------------
# In-training evaluation (train.py calls monitor every eval.every steps)

@functools.lru_cache(maxsize=4)
def load_tokenizer(path):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(path)


def monitor(ecfg, tokenizer_path, loss_fn, limit, step):
    """train.py's in-training benchmarks: the tasks of eval.tasks on a fixed subset of eval.limit examples
    each, in eval.mode with eval.shots shots, scored through loss_fn (the training layout's forward) on
    sequences of at most limit tokens. (record, line) for MetricsLog.write; keys like "eval/hellaswag_acc_norm"."""
    tokenizer = load_tokenizer(tokenizer_path)
    record, parts = {"step": step}, []
    for task in load_tasks(ecfg.tasks, ecfg.limit):
        r = evaluate_task(None, tokenizer, task, ecfg.mode, ecfg.shots, scorer=(loss_fn, limit))
        record.update({f"eval/{task.name}_{m}": r[m] for m in MODES[ecfg.mode]})
        parts.append(f"{task.name} {HEADLINE[ecfg.mode]} {r[HEADLINE[ecfg.mode]]:.3f}")
    return record, f"step {step:>6} | eval " + " | ".join(parts)


# ----------------------------------------------------------------------------------------
# Signal report: which benchmarks separate models at this scale

def ranks(xs):
    """0-based ranks; tied values share their mean rank."""
    s = sorted(xs)
    return [s.index(x) + (s.count(x) - 1) / 2 for x in xs]


def spearman(xs, ys):
    """Rank correlation; 0 when either side is constant (a flat curve does not rise)."""
    rx, ry = ranks(xs), ranks(ys)
    return statistics.correlation(rx, ry) if len(set(rx)) > 1 and len(set(ry)) > 1 else 0.0


def signal_report(curves, random_score, n):
    """The criteria FineWeb's ablations and FineTasks (Kydlíček, Penedo et al. 2024) use to keep
    a benchmark for small-model decisions, for one task. curves: {run: [(step, score)]}, one
    run per seed (same data and model); n: examples scored.
      monotonicity  Spearman correlation of score with step, mean over runs (FineTasks asks >= 0.5)
      seed_std      standard deviation across runs at each shared step, averaged
      snr           mean over shared steps of mean / std across runs (FineTasks asks > 20)
      above_random  final score (mean over runs) minus random, in points and in standard
                    errors of a random guesser on n examples, sqrt(r(1-r)/n)"""
    runs = [sorted(c) for c in curves.values() if c]
    final = statistics.fmean(c[-1][1] for c in runs)
    shared = sorted(set.intersection(*(set(s for s, _ in c) for c in runs)))
    by_step = [[dict(c)[s] for c in runs] for s in shared]
    stds = [statistics.stdev(v) for v in by_step] if len(runs) > 1 else []
    snrs = [statistics.fmean(v) / sd for v, sd in zip(by_step, stds) if sd > 0]
    z = (final - random_score) / math.sqrt(random_score * (1 - random_score) / n)
    return {"monotonicity": statistics.fmean(spearman(*zip(*c)) if len(c) > 1 else 0.0 for c in runs),
            "seed_std": statistics.fmean(stds) if stds else None, "snr": statistics.fmean(snrs) if snrs else None,
            "final": final, "random": random_score, "above_random": final - random_score, "above_random_z": z}


def verdict(s):
    """High signal when every criterion we can measure passes; z > 2 is about 95% confidence."""
    ok = s["monotonicity"] >= 0.5 and s["above_random_z"] > 2 and (s["snr"] is None or s["snr"] > 20)
    return "high signal" if ok else "low signal"


# ----------------------------------------------------------------------------------------
# Command line

def fmt(value, stderr=None):
    return "-" if value is None else f"{value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")


def results_table(results):
    metrics = [m for m in ("acc", "acc_token", "acc_norm", "acc_pmi") if any(m in r for r in results)]
    lines = ["| task | mode | shots | n | " + " | ".join(metrics) + " | random |",
             "|---|---|---|---|" + "---|" * len(metrics) + "---|"]
    for r in results:
        cells = " | ".join(fmt(r.get(m), r.get(m + "_stderr")) if m in r else "" for m in metrics)
        lines.append(f"| {r['task']} | {r['mode']} | {r['shots']} | {r['n']} | {cells} | {r['random']:.3f} |")
    return "\n".join(lines)


def signal_table(report):
    rows = [f"| {task} | {s['monotonicity']:.2f} | {fmt(s['seed_std'])} | {fmt(s['snr'])} | {s['final']:.3f} | "
            f"{s['random']:.3f} | {s['above_random']:+.3f} ({s['above_random_z']:+.1f}) | {verdict(s)} |"
            for task, s in report.items()]
    return "\n".join(["| task | monotonicity | seed std | SNR | final | random | above random (z) | verdict |",
                      "|---|---|---|---|---|---|---|---|", *rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (step_NNNNNNN)")
    p.add_argument("--tasks", default="", help=f"name=path,... names: {', '.join(PARSERS)}, or any other name "
                                               "for the generic JSONL format")
    p.add_argument("--mode", choices=MODES, default="norm", help="norm: cloze scored by sum, per token, per "
                                                                  "character; pmi: plus PMI; letter: A/B/C/D")
    p.add_argument("--shots", type=number(int, 0), default=0)
    p.add_argument("--limit", type=number(int, 0), default=0, help="a fixed random subset of N examples per task")
    p.add_argument("--seed", type=int, default=1234, help="few-shot draws and subsets")
    p.add_argument("--batch-size", type=number(int, 1), default=32)
    p.add_argument("--text", nargs="+", default=[], help="raw text files: perplexity and bits per byte")
    p.add_argument("--shards", help="a token-shard glob: perplexity and bits per byte")
    p.add_argument("--batches", type=number(int, 0), default=0, help="--shards: batches of 8 windows (0: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="results JSON (default: CHECKPOINT/eval.json)")
    p.add_argument("--report", help="append the results table to this report.md")
    args = p.parse_args(argv)
    if not (args.tasks or args.text or args.shards):
        p.error("give --tasks, --text or --shards")
    try:  # the task results, perplexities and bits per byte of one checkpoint, printed as a table
        _, model = checkpoint.load_model(args.checkpoint, args.device)
        tokenizer = load_tokenizer(os.path.join(args.checkpoint, "tokenizer.json"))
        autocast = torch.autocast("cuda", torch.bfloat16) if args.device == "cuda" else None
        tasks = [evaluate_task(model, tokenizer, task, args.mode, args.shots, args.seed, args.batch_size, autocast)
                 for task in load_tasks(args.tasks, args.limit, args.seed)] if args.tasks else []
        results = {"checkpoint": args.checkpoint, "tasks": tasks,
                   "text": {path: text_bpb(model, tokenizer, data.read_text(path)) for path in args.text},
                   "shards": {args.shards: shards_bpb(model, args.shards, args.batches)} if args.shards else {}}
        lines = [results_table(tasks)] if tasks else []
        lines += [f"- {kind} `{name}`: loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f}, {r['bpb']:.4f} bits "
                  f"per byte ({r['tokens']:,} tokens)"
                  for kind in ("text", "shards") for name, r in results[kind].items()]
        print("\n".join(lines))
        if args.report:
            with open(args.report, "a") as f:
                f.write(f"\n## Evaluation\n\nFrom `{args.checkpoint}`.\n\n" + "\n".join(lines) + "\n")
    except (ValueError, OSError) as e:  # bad input: one line naming the file and what is wrong
        raise SystemExit(f"error: {e}") from None
    out = args.out or os.path.join(args.checkpoint, "eval.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"results -> {out}")


if __name__ == "__main__":
    main()
