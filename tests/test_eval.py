import json
import math
import os
import re
import statistics

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import data
import eval as evaluation
from conftest import SHARED_DATA
from eval import Example, Task
from model import ModelConfig, Transformer

# ----------------------------------------------------------------------------------------
# Fixtures in each published format, a few lines each (written for these tests; the
# questions are made up). Each entry: file name, lines, the line-2 field a malformed copy
# drops, and what the first example must be.

FORMATS = {
    "hellaswag": ("hs.jsonl", [
        {"ind": 1, "activity_label": "Baking bread", "ctx_a": "A man kneads dough on a table.", "ctx_b": "he",
         "ctx": "A man kneads dough on a table. he", "split": "val", "split_type": "indomain", "label": 1,
         "endings": ["paints the dough [title] blue.", "puts the dough in the oven.", "sings.", "leaves."],
         "source_id": "made-up"},
        {"label": "0", "endings": ["opens a door.", "eats soup.", "runs.", "sits."], "ctx_b": "the woman",
         "activity_label": "Cooking", "ctx_a": "A woman stands in a kitchen."},  # field order differs
    ], "label", lambda ex: ex.context == "Baking bread: A man kneads dough on a table. He" and ex.gold == 1
        and ex.choices[0] == "paints the dough. blue."),
    "arc_easy": ("arc.jsonl", [
        {"id": "Q1", "question": {"stem": "Which gas do plants take in?", "choices": [
            {"text": "oxygen", "label": "A"}, {"text": "carbon dioxide", "label": "B"},
            {"text": "helium", "label": "C"}]}, "answerKey": "B"},
        {"id": "Q2", "question": "What melts ice?", "choices": {"text": ["heat", "cold"], "label": ["1", "2"]},
         "answerKey": "1"},  # the Hugging Face datasets layout
    ], "answerKey", lambda ex: ex.context == "Question: Which gas do plants take in?\nAnswer:" and ex.gold == 1
        and ex.choices == ["oxygen", "carbon dioxide", "helium"]),
    "openbookqa": ("obqa.jsonl", [
        {"id": "7-1", "question": {"stem": "The moon is lit by", "choices": [
            {"text": "the sun", "label": "A"}, {"text": "lamps", "label": "B"}]}, "answerKey": "A"},
        {"id": "7-2", "question_stem": "Water boils at", "choices": {"text": ["100 C", "5 C"], "label": ["A", "B"]},
         "answerKey": "A"},
    ], "question", lambda ex: ex.context == "The moon is lit by" and ex.choices == ["the sun", "lamps"]),
    "commonsenseqa": ("csqa.jsonl", [
        {"answerKey": "C", "id": "c1", "question": {"question_concept": "pen", "choices": [
            {"label": "A", "text": "sky"}, {"label": "B", "text": "sea"}, {"label": "C", "text": "desk"}],
            "stem": "Where would you keep a pen?"}},
        {"answerKey": "A", "id": "c2", "question": {"question_concept": "cup", "choices": [
            {"label": "A", "text": "table"}, {"label": "B", "text": "cloud"}], "stem": "Where is a cup?"}},
    ], "answerKey", lambda ex: ex.gold == 2 and ex.question == "Question: Where would you keep a pen?"),
    "piqa": ("piqa.jsonl", [
        {"goal": "Dry wet shoes", "sol1": "Stuff them with newspaper.", "sol2": "Fill them with water."},
        {"sol2": "Use a spoon.", "goal": "Cut paper", "sol1": "Use scissors."},
    ], "sol2", lambda ex: ex.context == "Question: Dry wet shoes\nAnswer:" and ex.gold == 0),
    "winogrande": ("wg.jsonl", [
        {"qID": "w1", "sentence": "The cup fell off the shelf because _ was too narrow.", "option1": "the cup",
         "option2": "the shelf", "answer": "2"},
        {"context_options": ["Ann thanked Beth because Ann", "Ann thanked Beth because Beth"],
         "continuation": "had helped.", "gold": 1},  # llm-foundry's schema layout
    ], "continuation", lambda ex: ex.context == "The cup fell off the shelf because "
        and ex.suffix == " was too narrow." and ex.choices == ["the cup", "the shelf"] and ex.gold == 1),
    "custom": ("custom.jsonl", [
        {"context": "2 + 2 =", "choices": ["4", "5"], "gold": 0},
        {"query": "The sky is", "choices": ["blue", "green"], "gold": 0},
    ], "gold", lambda ex: ex.context == "2 + 2 =" and ex.choices == ["4", "5"]),
}
PIQA_LABELS = "0\n0\n"


def write_format(tmp_path, name, drop=None):
    filename, rows, _, _ = FORMATS[name]
    rows = [dict(r) for r in rows]
    if drop:
        rows[1].pop(drop, None)
        if name == "openbookqa":
            rows[1].pop("question_stem")
    path = tmp_path / filename
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if name == "piqa":
        (tmp_path / "piqa-labels.lst").write_text(PIQA_LABELS)
    return str(path)


@pytest.mark.parametrize("name", FORMATS)
def test_loader_reads_published_format(tmp_path, name):
    task = evaluation.load_task(name, write_format(tmp_path, name))
    assert len(task.examples) == 2 and task.pool is task.examples
    assert FORMATS[name][3](task.examples[0]), task.examples[0]
    assert all(0 <= ex.gold < len(ex.choices) for ex in task.examples)


@pytest.mark.parametrize("name", FORMATS)
def test_loader_rejects_missing_field_naming_file_and_line(tmp_path, name):
    path = write_format(tmp_path, name, drop=FORMATS[name][2])
    with pytest.raises(evaluation.TaskFormatError, match=rf"{path}:2: .*missing field '{FORMATS[name][2]}'"):
        evaluation.load_task(name, path)


def test_winogrande_schema_layout_equals_original(tmp_path):
    path = tmp_path / "wg.jsonl"
    path.write_text(json.dumps({"sentence": "Ann thanked Beth because _ had helped.", "option1": "Ann",
                                "option2": "Beth", "answer": "2"}) + "\n")
    original = evaluation.load_task("winogrande", str(path)).examples[0]
    schema = evaluation.load_task("winogrande", write_format(tmp_path, "winogrande")).examples[1]
    assert (original.context, original.choices, original.suffix, original.gold) == \
        (schema.context, schema.choices, schema.suffix, schema.gold)


@pytest.mark.parametrize("text, message", [
    ('{"context": "a", "choices": ["x", "y"], "gold": 0}\n{"context": "b", "choices": ["x"', "2: not valid JSON"),
    ('{"context": "a", "choices": ["x", "y"], "gold": 2}\n', "1: custom: gold answer 2 is out of range"),
    ('{"context": "a", "choices": ["x"], "gold": 0}\n', "1: custom: expected a text context and at least two"),
    ('["a", "b"]\n', "1: custom: expected a JSON object"),
])
def test_generic_loader_rejects_malformed_rows(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(evaluation.TaskFormatError, match=f"{path}:{message}"):
        evaluation.load_task("custom", str(path))


def test_ai2_loader_rejects_an_answer_key_that_is_no_label(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps({"question": {"stem": "q", "choices": [{"text": "a", "label": "A"},
                                                                    {"text": "b", "label": "B"}]},
                                "answerKey": "E"}) + "\n")
    with pytest.raises(evaluation.TaskFormatError, match=rf"{path}:1: arc_easy: answerKey 'E' is not one of"):
        evaluation.load_task("arc_easy", str(path))


def test_piqa_needs_its_labels(tmp_path):
    path = write_format(tmp_path, "piqa")
    (tmp_path / "piqa-labels.lst").write_text("0\n")
    with pytest.raises(evaluation.TaskFormatError, match="2 questions but 1 labels"):
        evaluation.load_task("piqa", path)
    os.remove(tmp_path / "piqa-labels.lst")
    with pytest.raises(evaluation.TaskFormatError, match=rf"{path}:1: piqa: missing field 'label'"):
        evaluation.load_task("piqa", path)


def write_mmlu(tmp_path):
    """The original headerless CSVs (answer letter) for test, a Hugging Face style header
    (answer index, columns in another order) for dev, in Hendrycks's data/{dev,test} layout."""
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "dev").mkdir()
    (tmp_path / "mmlu" / "test" / "math_test.csv").write_text(
        '"What is 2 + 2, in words?",three,four,five,six,B\nWhat is 3 * 3?,6,8,9,12,C\n')
    (tmp_path / "mmlu" / "test" / "art_test.csv").write_text('Who painted the Mona Lisa?,Monet,"Leonardo, da Vinci",'
                                                            'Dali,Kahlo,B\n')
    (tmp_path / "mmlu" / "dev" / "math_dev.csv").write_text(
        "answer,question,choice0,choice1,choice2,choice3\n0,What is 1 + 1?,2,3,4,5\n3,What is 10 / 2?,1,2,3,5\n")
    (tmp_path / "mmlu" / "dev" / "art_dev.csv").write_text(
        "question,choice0,choice1,choice2,choice3,answer\nWho painted Guernica?,Picasso,Goya,Miro,Dali,0\n")
    return str(tmp_path / "mmlu")


def test_mmlu_reads_both_csv_layouts_with_dev_as_fewshot_pool(tmp_path):
    task = evaluation.load_task("mmlu", write_mmlu(tmp_path))
    assert [(ex.group, ex.gold) for ex in task.examples] == [("art", 1), ("math", 1), ("math", 2)]
    assert task.examples[0].choices[1] == "Leonardo, da Vinci"
    assert [(ex.group, ex.gold) for ex in task.pool] == [("art", 0), ("math", 0), ("math", 3)]
    single = evaluation.load_task("mmlu", str(tmp_path / "mmlu" / "test" / "math_test.csv"))
    assert len(single.examples) == 2 and [ex.group for ex in single.pool] == ["math", "math"]
    pool = {"math": [p for p in task.pool if p.group == "math"], "art": [task.pool[0]]}
    for seed in range(5):  # shots come from the question's own subject
        assert {s.group for s in evaluation.fewshot(pool, task.examples[1], 2, seed)} == {"math"}
    (tmp_path / "mmlu" / "test" / "bad_test.csv").write_text("q,a,b,c,d,A\nq2,a,b,c,A\n")
    with pytest.raises(evaluation.TaskFormatError, match=r"bad_test.csv:2: mmlu: 5 columns, expected 6"):
        evaluation.load_task("mmlu", str(tmp_path / "mmlu"))


# ----------------------------------------------------------------------------------------
# Scoring modes against a hand computation from the model's own log-probabilities

@pytest.fixture(scope="module")
def tok(tokens_dir):
    return evaluation.load_tokenizer(str(tokens_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   max_seq_len=128, init_std=0.1)).eval()


EXAMPLES = [
    Example("Question: What does json.dumps return?\nAnswer:", ["a str", "a list of bytes, numbers and dicts", "None"],
            0, question="Question: What does json.dumps return?"),
    Example("The email package parses", ["messages", "images into pixels and colours", "x"], 2),
    Example("def load(fp):\n    return", [" json.load(fp)", " None", " fp.read().split()"], 1),
    Example("Sarah lent Maria a book because ", ["Sarah", "Maria"], 0, question="Sarah lent Maria a book because _ "
            "was kind.", suffix=" was kind."),
    Example("import", ["os", "json, email and sys", "email.parser"], 1),
]


def hand_loglik(model, tok, context, continuation):
    """Sum of log P(continuation tokens) after BOS + context, and the token count."""
    ctx = [tok.token_to_id("<|bos|>")] + tok.encode(context, add_special_tokens=False).ids
    cont = tok.encode(continuation, add_special_tokens=False).ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0].float(), -1)
    return sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont)), len(cont)


def hand_scores(model, tok, ex, mode):
    if mode == "letter":
        options = "".join(f"\n{'ABC'[j]}. {c}" for j, c in enumerate(ex.choices))
        prompt = (ex.question or ex.context) + options + "\nAnswer:"
        return {"acc": [hand_loglik(model, tok, prompt, " " + "ABC"[j])[0] for j in range(len(ex.choices))]}
    pairs = [(ex.context + c, ex.suffix) if ex.suffix else (ex.context, " " + c) for c in ex.choices]
    lls = [hand_loglik(model, tok, c, x) for c, x in pairs]
    scores = {"acc": [s for s, _ in lls], "acc_token": [s / n for s, n in lls],
              "acc_norm": [s / len(ex.suffix or c) for (s, _), c in zip(lls, ex.choices)]}
    if mode == "pmi":
        scores["acc_pmi"] = [s - hand_loglik(model, tok, "Answer:", x)[0] for s, (_, x) in zip(scores["acc"], pairs)]
    return scores


def argmax(xs):
    return max(range(len(xs)), key=xs.__getitem__)


@pytest.mark.parametrize("mode", ["norm", "pmi", "letter"])
def test_each_scoring_mode_equals_hand_computation(model, tok, mode):
    task = Task("t", EXAMPLES, EXAMPLES)
    got = evaluation.score_task(model, tok, task, mode, batch_size=3)
    want = [hand_scores(model, tok, ex, mode) for ex in EXAMPLES]
    for g, w in zip(got, want):
        assert g.keys() == w.keys() == set(evaluation.MODES[mode])
        for metric in w:
            assert g[metric] == pytest.approx(w[metric], abs=1e-4), metric
    result = evaluation.evaluate_task(model, tok, task, mode, batch_size=3)
    for metric in evaluation.MODES[mode]:
        hits = [argmax(w[metric]) == ex.gold for w, ex in zip(want, EXAMPLES)]
        p = sum(hits) / len(hits)
        assert result[metric] == p
        assert result[metric + "_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (len(hits) - 1)))
    if mode == "norm":  # the metrics rank differently here, so a mix-up of two would show
        assert len({tuple(argmax(w[m]) for w in want) for m in evaluation.MODES[mode]}) > 1


def test_contexts_and_continuations_encode_as_the_joined_text_would(tok):
    for ex in EXAMPLES:
        for mode in ("norm", "letter"):
            for context, continuation in evaluation.requests(ex, mode):
                joined = tok.encode(context + continuation, add_special_tokens=False).ids
                assert joined == (tok.encode(context, add_special_tokens=False).ids
                                  + tok.encode(continuation, add_special_tokens=False).ids)


def test_batching_and_shared_rows_change_nothing(model, tok):
    reqs = [r for ex in EXAMPLES for mode in ("norm", "letter") for r in evaluation.requests(ex, mode)]
    encoded = evaluation.encode_requests(tok, reqs)
    one_by_one = evaluation.loglikelihoods(model, encoded, batch_size=1, share_prefix=False)
    batched = evaluation.loglikelihoods(model, encoded, batch_size=16)
    assert [n for _, n in one_by_one] == [n for _, n in batched]
    assert [s for s, _ in batched] == pytest.approx([s for s, _ in one_by_one], abs=1e-4)
    ctx = [0, 5, 6, 7]  # single-token continuations of one context share a row; identical requests too
    rows = evaluation.plan_rows([(ctx, [8]), (ctx, [9]), (ctx, [10, 11]), (ctx, [9]), ([0, 5], [6])], 128)
    assert rows == [((0, 5, 6, 7), [(0, 3, [8]), (1, 3, [9]), (3, 3, [9])]),
                    ((0, 5, 6, 7, 10), [(2, 3, [10, 11])]), ((0, 5), [(4, 1, [6])])]


@pytest.mark.parametrize("context, continuation", [
    ("for key in sorted(values):\n    " * 40, " print(key)"),  # the context is cut on the left
    ("x =", " [" + ", ".join(map(str, range(60))) + "]"),     # the continuation alone is over 128 tokens
])
def test_what_does_not_fit_is_cut_on_the_left(model, tok, context, continuation):
    [(s, n)] = evaluation.loglikelihoods(model, evaluation.encode_requests(tok, [(context, continuation)]))
    cont = tok.encode(continuation, add_special_tokens=False).ids
    ids = ([tok.token_to_id("<|bos|>")] + tok.encode(context, add_special_tokens=False).ids + cont)[-129:]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], -1)
    assert len(ids) == 129 and n == min(len(cont), 128)
    assert s == pytest.approx(sum(logp[k, ids[k + 1]].item() for k in range(128 - n, 128)), abs=1e-4)


def test_fewshot_prompts_are_fixed_by_seed_and_never_show_the_question():
    pool = {"": EXAMPLES}
    for ex in EXAMPLES:
        shots = evaluation.fewshot(pool, ex, 2, seed=1)
        assert len(shots) == 2 and ex not in shots
        assert evaluation.fewshot(pool, ex, 2, seed=1) == shots
        prefix = "".join(evaluation.solved(s, "norm") + "\n\n" for s in shots)
        assert evaluation.requests(ex, "norm", shots) == [(prefix + c, x) for c, x in evaluation.requests(ex, "norm")]
    assert any(evaluation.fewshot(pool, ex, 2, seed=1) != evaluation.fewshot(pool, ex, 2, seed=2) for ex in EXAMPLES)


def test_transformers_scores_equal_ours(model, tok, tmp_path):
    """The model exported with checkpoint.save_hf and run by transformers' LlamaForCausalLM scores
    every choice the same."""
    transformers = pytest.importorskip("transformers")
    checkpoint.save_hf(model, str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    task = Task("t", EXAMPLES, EXAMPLES)
    for mode in ("pmi", "letter"):
        ours = evaluation.score_task(model, tok, task, mode, shots=1)
        theirs = evaluation.score_task(hf, tok, task, mode, shots=1)
        for a, b in zip(ours, theirs):
            for metric in a:
                assert a[metric] == pytest.approx(b[metric], abs=1e-4)
        a, b = evaluation.evaluate_task(hf, tok, task, mode, 1), evaluation.evaluate_task(model, tok, task, mode, 1)
        assert {**a, "seconds": 0} == {**b, "seconds": 0}


# ----------------------------------------------------------------------------------------
# Bits per byte and perplexity

def test_shard_bits_per_byte_is_loss_times_tokens_over_bytes_ln2(model, tokens_dir):
    pattern = str(tokens_dir / "val_*.bin")
    token_bytes = torch.tensor(data.token_byte_lengths(data.tokenizer_path(pattern)))
    loader = data.Loader(pattern, 32, 4, shuffle=False)
    loss, bpb = evaluation.loss_and_bpb(model, loader, 3, token_bytes)
    loader = data.Loader(pattern, 32, 4, shuffle=False)
    loss_sum, n_tokens, n_bytes = 0.0, 0, 0
    for _ in range(3):
        x, y = loader.next_batch()
        with torch.no_grad():
            loss_sum += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
        n_tokens, n_bytes = n_tokens + y.numel(), n_bytes + int(token_bytes[y].sum())
    assert loss == pytest.approx(loss_sum / n_tokens, rel=1e-5)
    assert bpb == pytest.approx(loss * n_tokens / (n_bytes * math.log(2)), rel=1e-5)
    r = evaluation.shards_bpb(model, pattern, batches=2)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))


def test_text_bits_per_byte_is_loss_times_tokens_over_bytes_ln2(model, tok, tokens_dir):
    text = "Un café naïve — über 42 façades. " * 30 + "def f(x):\n    return x\n"
    r = evaluation.text_bpb(model, tok, text, batch_size=2)
    ids = [tok.token_to_id("<|bos|>")] + tok.encode(text, add_special_tokens=False).ids
    lengths = data.token_byte_lengths(str(tokens_dir / "tokenizer.json"))
    assert sum(lengths[i] for i in ids) == len(text.encode())  # the targets stand for every byte
    loss_sum = 0.0
    for s in range(0, len(ids) - 1, 128):  # disjoint windows of the model's 128 positions
        x, y = torch.tensor([ids[s:s + 128]]), torch.tensor(ids[s + 1:s + 129])
        with torch.no_grad():
            loss_sum += F.cross_entropy(model(x)[0, :len(y)], y, reduction="sum").item()
    assert len(ids) - 1 > 128 and r["tokens"] == len(ids) - 1 and r["bytes"] == len(text.encode())
    assert r["loss"] == pytest.approx(loss_sum / r["tokens"], rel=1e-5)
    assert r["bpb"] == pytest.approx(r["loss"] * r["tokens"] / (r["bytes"] * math.log(2)), rel=1e-6)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))


# ----------------------------------------------------------------------------------------
# Command line, in-training evaluation, signal report

def task_spec(tmp_path):
    return ",".join(f"{name}={write_format(tmp_path, name)}" for name in ("hellaswag", "winogrande", "custom"))


def test_cli_writes_results_json_and_table(tiny_config, tmp_path, capsys):
    import train
    cfg = tiny_config(optim=dict(steps=2))
    train.train(cfg)
    ckpt = checkpoint.step_dirs(os.path.join(cfg.log.dir, "checkpoints"))[-1]
    (tmp_path / "page.txt").write_text("The json module encodes and decodes JSON documents. " * 10)
    evaluation.main(["--checkpoint", ckpt, "--tasks", task_spec(tmp_path), "--mode", "pmi", "--shots", "1",
                     "--text", str(tmp_path / "page.txt"), "--report", str(tmp_path / "report.md")])
    out = capsys.readouterr().out
    results = json.load(open(os.path.join(ckpt, "eval.json")))
    assert [r["task"] for r in results["tasks"]] == ["hellaswag", "winogrande", "custom"]
    _, model = checkpoint.load_model(ckpt)
    tok = evaluation.load_tokenizer(os.path.join(ckpt, "tokenizer.json"))
    for r, task in zip(results["tasks"], evaluation.load_tasks(task_spec(tmp_path))):
        assert r["n"] == 2 and r["shots"] == 1
        assert r["acc_pmi"] == evaluation.evaluate_task(model, tok, task, "pmi", shots=1)["acc_pmi"]
    assert "| winogrande | pmi | 1 | 2 |" in out and "bits per byte" in out
    assert results["text"][str(tmp_path / "page.txt")]["bpb"] > 0
    assert "## Evaluation" in (tmp_path / "report.md").read_text()
    with pytest.raises(SystemExit, match="missing field"):
        evaluation.main(["--checkpoint", ckpt, "--tasks", f"piqa={write_format(tmp_path, 'custom', drop='gold')}"])
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(SystemExit, match=f"{tmp_path / 'latin1.txt'}: not UTF-8 text"):
        evaluation.main(["--checkpoint", ckpt, "--text", str(tmp_path / "latin1.txt")])
    with pytest.raises(SystemExit, match=f"{tmp_path / 'nope'}: no such checkpoint directory"):
        evaluation.main(["--checkpoint", str(tmp_path / "nope"), "--text", str(tmp_path / "page.txt")])


@pytest.mark.parametrize("text, message", [
    ("", "no examples"),
    ('{"context": "a", "choices": "bc", "gold": 0}\n', "choices must be a list of texts, got str"),
    ('{"context": "a", "choices": ["b", "c"], "gold": 1.5}\n', "gold answer 1.5 is not a whole number"),
    ('{"context": "a", "choices": ["b", "c"], "gold": true}\n', "gold answer True is not a whole number"),
])
def test_malformed_task_files_are_named(tmp_path, text, message):
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    with pytest.raises(evaluation.TaskFormatError, match=re.escape(message)):
        evaluation.load_task("custom", str(path))


def test_training_logs_benchmarks_every_eval_every_steps(tiny_config, tmp_path, tok):
    import train
    cfg = tiny_config(optim=dict(steps=4), eval=dict(every=2, tasks=task_spec(tmp_path), limit=2, mode="norm"))
    train.train(cfg)
    with open(os.path.join(cfg.log.dir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "eval/hellaswag_acc_norm" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"eval/winogrande_acc", "eval/custom_acc_token"} <= evals[-1].keys()
    _, final = checkpoint.load_model(checkpoint.step_dirs(os.path.join(cfg.log.dir, "checkpoints"))[-1])
    for task in evaluation.load_tasks(cfg.eval.tasks, 2):  # the logged score is the final model's score
        assert evals[-1][f"eval/{task.name}_acc_norm"] == evaluation.evaluate_task(final, tok, task)["acc_norm"]


def test_spearman_and_signal_report_by_hand():
    assert evaluation.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert evaluation.spearman([1, 2, 3], [0.5, 0.4, 0.3]) == pytest.approx(-1.0)
    assert evaluation.spearman([1, 2, 3], [0.3, 0.3, 0.3]) == 0.0
    assert evaluation.spearman([1, 2, 3, 4], [0.1, 0.2, 0.2, 0.3]) == pytest.approx(0.9486833, abs=1e-6)
    curves = {"seed0": [(200, 0.30), (100, 0.26), (300, 0.35)], "seed1": [(100, 0.28), (200, 0.27), (300, 0.39)]}
    s = evaluation.signal_report(curves, 0.25, n=1000)
    assert s["monotonicity"] == pytest.approx((1.0 + 0.5) / 2)
    stds = [statistics.stdev(p) for p in ([0.26, 0.28], [0.30, 0.27], [0.35, 0.39])]
    assert s["seed_std"] == pytest.approx(sum(stds) / 3)
    assert s["snr"] == pytest.approx((0.27 / stds[0] + 0.285 / stds[1] + 0.37 / stds[2]) / 3)
    assert s["final"] == pytest.approx(0.37) and s["above_random"] == pytest.approx(0.12)
    assert s["above_random_z"] == pytest.approx(0.12 / math.sqrt(0.25 * 0.75 / 1000))
    assert evaluation.verdict(s) == "low signal"  # SNR about 15, under FineTasks' 20
    flat = evaluation.signal_report({"a": [(1, 0.25), (2, 0.25)]}, 0.25, n=100)
    assert flat["seed_std"] is None and flat["monotonicity"] == 0.0 and evaluation.verdict(flat) == "low signal"


# ----------------------------------------------------------------------------------------
# The real benchmark files (skipped when ../shared/data is absent)

REAL = os.path.join(SHARED_DATA, "eval")


@pytest.mark.skipif(not os.path.isdir(REAL), reason="no shared benchmark data")
@pytest.mark.parametrize("name, path, n", [
    ("hellaswag", "hellaswag_val_1000.jsonl", 1000), ("arc_easy", "arc_easy_test.jsonl", 2376),
    ("piqa", "piqa_valid.jsonl", 1838), ("winogrande", "winogrande_dev.jsonl", 1267), ("copa", "copa.jsonl", 100),
    ("mmlu", "mmlu", 14042)])
def test_real_benchmark_files_load(name, path, n):
    task = evaluation.load_task(name, os.path.join(REAL, path))
    assert len(task.examples) == n  # the row counts SOURCES.md gives
    if name == "mmlu":
        assert len(task.pool) == 285 and len({ex.group for ex in task.examples}) == 57
    if name == "winogrande":
        assert all(ex.suffix and len(ex.choices) == 2 for ex in task.examples)
