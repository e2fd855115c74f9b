"""Alignment: the losses against closed forms and TRL's formulas, chat tokens and masks,
packing, the data layouts and their errors, and SFT, RM, DPO, RLOO, GRPO and PPO learning
on tiny models, under dp2 and tp2 as on one process, resuming exactly."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

import align
from conftest import SHARED_DATA, spawn
from config import ConfigError, config_from_dict
from prep.tokenizer import chat_text


@pytest.fixture(scope="module")
def base(tokens_dir, tmp_path_factory):
    """A tiny pretrained checkpoint (one step on the session's shards) and the demo's data."""
    import train
    d = tmp_path_factory.mktemp("align")
    cfg = config_from_dict({"model": dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2,
                                          max_seq_len=64),
                            "data": dict(train=str(tokens_dir / "train_*.bin"), seq_len=32, micro_batch=2),
                            "optim": dict(steps=1, warmup=0), "log": dict(dir=str(d / "base")),
                            "eval": dict(val_every=0)})
    train.train(cfg)
    align.demo_data(str(d / "data"), n=160)
    return {"ckpt": str(d / "base" / "checkpoints" / "step_0000001"), "data": d / "data", "dir": d,
            "tok": Tokenizer.from_file(str(tokens_dir / "tokenizer.json"))}


def align_config(base, run, method, **sections):
    kind = "sft" if method == "sft" else "dpo"
    d = {"data": dict(seq_len=63, micro_batch=4, seed=0),
         "optim": dict(lr=3e-3, min_lr=3e-4, warmup=0, steps=12, weight_decay=0.0),
         "log": dict(dir=str(base["dir"] / run), every=1), "eval": dict(val_every=0),
         "checkpoint": dict(asynchronous=False), "train": dict(init_from=base["ckpt"]),
         "align": dict(method=method, train=str(base["data"] / f"{kind}.jsonl"),
                       val=str(base["data"] / f"{kind}_val.jsonl"))}
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return config_from_dict(d)


def metrics(cfg):
    with open(os.path.join(cfg.log.dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------
# Losses

def trl_dpo_losses(pc, pr, rc, rr, beta, loss_type, label_smoothing):
    """TRL's DPOTrainer.dpo_loss (trl/trainer/dpo_trainer.py), written out for these inputs."""
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        return (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                - F.logsigmoid(-beta * logits) * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    return (logits - 1 / (2 * beta)) ** 2  # ipo


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_losses_equal_closed_forms_and_trl(loss_type, smoothing):
    pc, pr, rc, rr = (torch.tensor(v, dtype=torch.float64) for v in
                      ([-5.0, -9.0, -2.0], [-7.0, -4.0, -2.5], [-6.0, -8.0, -2.2], [-6.5, -5.0, -2.4]))
    beta = 0.3
    losses, r_chosen, r_rejected = align.dpo_loss(pc, pr, rc, rr, beta, loss_type, smoothing)
    h = [(a - b) - (c - d) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    closed = {"sigmoid": [-(1 - smoothing) * math.log(1 / (1 + math.exp(-beta * x)))
                          - smoothing * math.log(1 / (1 + math.exp(beta * x))) for x in h],
              "ipo": [(x - 1 / (2 * beta)) ** 2 for x in h], "hinge": [max(0.0, 1 - beta * x) for x in h]}[loss_type]
    assert losses.tolist() == pytest.approx(closed, rel=1e-12)
    assert torch.allclose(losses, trl_dpo_losses(pc, pr, rc, rr, beta, loss_type, smoothing))
    assert r_chosen.tolist() == pytest.approx((beta * (pc - rc)).tolist())
    assert r_rejected.tolist() == pytest.approx((beta * (pr - rr)).tolist())


def test_reward_functions():
    ex = {"answer": "Natalia sold 48/2 = 24 clips.\n#### 1,072"}
    assert align.gsm8k_reward("so 1000 + 72 = 1072", ex) == 1.0
    assert align.gsm8k_reward("the answer is 1,072.", ex) == 1.0
    assert align.gsm8k_reward("1072 or maybe 1073", ex) == 0.0
    assert align.gsm8k_reward("no number", ex) == 0.0
    ask = {"prompt": "List these names: print open"}
    assert align.list_format_reward("print, open.", ask) == 1.0
    assert align.list_format_reward("print open", ask) == 0.5  # the names, not the format
    assert align.list_format_reward("open, zip.", ask) == 0.75  # the format, half the names


# ----------------------------------------------------------------------------------------
# Tokens, masks, packing

def test_sft_masks_exactly_the_non_assistant_tokens(base):
    tok = base["tok"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a module."},
                {"role": "assistant", "content": "json"}, {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "email, of course"}]
    ids, labels = align.chat_ids(tok, messages)
    assert ids == tok.encode(chat_text(messages, add_generation_prompt=False), add_special_tokens=False).ids
    end, asst = tok.token_to_id("<|end|>"), tok.token_to_id("<|assistant|>")
    expected, inside = [], False
    for t in ids:  # trained: from after <|assistant|> up to and including its <|end|>
        expected.append(t if inside else -100)
        inside = (inside and t != end) or t == asst
    assert labels == expected
    trained = tok.decode([t for t in labels if t != -100], skip_special_tokens=False)
    assert trained == "json<|end|>email, of course<|end|>"


def test_packed_conversations_give_each_its_own_loss(base):
    import checkpoint
    cfg, model = checkpoint.load_model(base["ckpt"])
    tok = base["tok"]
    rows = [align.chat_ids(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, a in (("if x:", "pass"), ("def f", "return"), ("import", "json"))]
    bos = tok.token_to_id("<|bos|>")
    packed = align.pack(rows, 64)
    assert len(packed) == 1 and sum(len(r[0]) for r in rows) == len(packed[0][0])
    x, y = align.collate(packed, 2, "cpu")
    with torch.no_grad():
        together = align.logps(model, x, y, align.document_starts(x, bos))[0]
        alone = [align.logps(model, *align.collate([r], 2, "cpu"))[0] for r in rows]
        wrong = align.logps(model, x, y)[0]  # without the document mask: conversations see each other
    at = 0
    for r, lp in zip(rows, alone):
        n = len(r[0])
        torch.testing.assert_close(together[at:at + n - 1], lp[:n - 1], atol=1e-5, rtol=1e-5)
        at += n
    assert not torch.allclose(together, wrong, atol=1e-3)


# ----------------------------------------------------------------------------------------
# Layouts and errors

def test_every_layout_reads_to_the_same_messages():
    want = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert align.conversation({"messages": want}, "x") == want
    assert align.conversation({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
                              "x") == want
    assert align.conversation({"instruction": "Hi", "input": "", "output": "Hello"}, "x") == want
    alpaca = align.conversation({"instruction": "Say", "input": "hi", "output": "Hello"}, "x")
    assert alpaca[0]["content"] == "Say\n\nhi"
    pair = ([{"role": "user", "content": "Hi"}], "Good", "Bad")
    assert align.preference({"prompt": "Hi", "chosen": "Good", "rejected": "Bad"}, "x") == pair
    assert align.preference({"prompt": "Hi", "chosen": [{"role": "user", "content": "Hi"},
                                                         {"role": "assistant", "content": "Good"}],
                             "rejected": [{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Bad"}]}, "x") == pair  # UltraFeedback
    assert align.preference({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Good"}],
                             "rejected": [{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Bad"}]}, "x") == pair
    assert align.preference({"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt",
                             "value": "Good"}, "rejected": {"from": "gpt", "value": "Bad"}}, "x") == pair
    hh = align.preference({"chosen": "\n\nHuman: Hi\n\nAssistant: Yo\n\nHuman: Again\n\nAssistant: Good",
                           "rejected": "\n\nHuman: Hi\n\nAssistant: Yo\n\nHuman: Again\n\nAssistant: Bad"}, "x")
    assert hh == ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                   {"role": "user", "content": "Again"}], "Good", "Bad")
    assert align.prompt_of({"question": "2+2?", "answer": "#### 4"}, "x") == [{"role": "user", "content": "2+2?"}]


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "align")), reason="no ../shared/data")
def test_real_samples_read():
    d = os.path.join(SHARED_DATA, "align")
    for where, row in align.read_rows(os.path.join(d, "alpaca_en_demo.json")):
        assert align.conversation(row, where)[-1]["role"] == "assistant"
    for where, row in align.read_rows(os.path.join(d, "dpo_en_demo.json")):
        prompt, chosen, rejected = align.preference(row, where)
        assert prompt and chosen != rejected
    rows = align.read_rows(os.path.join(d, "hh_rlhf_harmless_base_test.jsonl.gz"))[:200]
    assert all(align.preference(row, where)[0][-1]["role"] == "user" for where, row in rows)
    for where, row in align.read_rows(os.path.join(d, "gsm8k_test.jsonl"))[:50]:
        align.prompt_of(row, where)
        assert align.gsm8k_reward(row["answer"], row) == 1.0  # the reference solution solves itself


@pytest.mark.parametrize("line,message", [
    ('{"messages": [{"role": "user", "content": "hi"}]', "invalid JSON"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', r"messages\[0\]: want"),
    ('{"messages": []}', "non-empty list"),
    ('{"text": "hi"}', "needs messages, conversations"),
    ('["a list"]', "expected a JSON object"),
])
def test_malformed_chat_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(ValueError, match=f"{path}:3: .*{message}"):
        [align.conversation(row, where) for where, row in align.read_rows(str(path))]


@pytest.mark.parametrize("row,message", [
    ({"prompt": "hi", "chosen": "a"}, "needs chosen and rejected"),
    ({"prompt": "hi", "chosen": "a", "rejected": 3}, "chosen and rejected must be"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"},
     "share the transcript"),
    ({"chosen": "no transcript", "rejected": "x"}, "Human: and Assistant:"),
])
def test_malformed_preference_line_names_file_and_line(tmp_path, row, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: .*{message}"):
        [align.preference(r, where) for where, r in align.read_rows(str(path))]


def test_bad_configs_are_refused(base):
    with pytest.raises(ConfigError, match="train.init_from"):
        align.align(align_config(base, "bad", "sft", train=dict(init_from="")))
    with pytest.raises(ConfigError, match="align.reward"):
        align.align(align_config(base, "bad", "grpo"))
    with pytest.raises(ConfigError, match="rollouts generate"):
        align.align(align_config(base, "bad", "ppo", parallel=dict(tp=2), align=dict(reward="align:gsm8k_reward")))
    with pytest.raises(ConfigError, match="beta must be above 0"):
        align.align(align_config(base, "bad", "dpo", align=dict(beta=0.0, loss="ipo")))
    with pytest.raises(ConfigError, match="max_seq_len"):
        align.align(align_config(base, "bad", "sft", data=dict(seq_len=64)))


# ----------------------------------------------------------------------------------------
# Learning

def test_dpo_learns_the_preference(base):
    cfg = align_config(base, "dpo", "dpo", optim=dict(steps=30))
    align.align(cfg)
    val = [r for r in metrics(cfg) if "val_accuracy" in r]
    assert val[0]["val_margin"] == 0.0 and val[-1]["val_margin"] > 1.0
    assert val[-1]["val_accuracy"] > 0.9


def test_reward_model_ranks_held_out_pairs(base):
    cfg = align_config(base, "rm", "rm", optim=dict(steps=15))
    align.align(cfg)
    val = [r for r in metrics(cfg) if "val_accuracy" in r]
    assert val[0]["val_accuracy"] == 0.0 and val[0]["val_loss"] == pytest.approx(0.6931, abs=1e-4)  # a zero head
    assert val[-1]["val_accuracy"] > 0.9


def favoured(text, example):
    """A verifiable reward: the share of a completion's characters among a few letters."""
    return sum(c in "aeiou" for c in text) / max(len(text), 1)


# Without the KL penalty (beta = 0) each of these runs drifts to about 50 nats from the
# reference (8 tokens) as its reward saturates; the bounds catch a penalty that does nothing.
@pytest.mark.parametrize("method,beta,kl_bound", [("rloo", 0.02, 35.0), ("grpo", 0.3, 20.0), ("ppo", 0.02, 25.0)])
def test_rl_raises_the_reward_with_bounded_kl(base, method, beta, kl_bound, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something {i}"}) + "\n" for i in range(16)))
    cfg = align_config(base, method, method, optim=dict(steps=60, lr=3e-2, min_lr=3e-2),
                       align=dict(train=str(prompts), val="", reward="test_align:favoured", samples=4,
                                  max_new_tokens=8, beta=beta))
    align.align(cfg)
    steps = [r for r in metrics(cfg) if "reward" in r]
    first, last = (sum(r["reward"] for r in part) / len(part) for part in (steps[:3], steps[-3:]))
    assert last > first + 0.1, (first, last)
    assert max(r["kl"] for r in steps) < kl_bound


# ----------------------------------------------------------------------------------------
# Layouts and resume

def run_in_layout(cfg):
    align.align(cfg)
    import torch.distributed as dist
    return [(r["loss"], r["grad_norm"]) for r in metrics(cfg) if "grad_norm" in r] if dist.get_rank() == 0 else None


@pytest.mark.parametrize("method,layout", [("sft", dict(dp=2, zero=1)), ("dpo", dict(dp=2)), ("dpo", dict(tp=2))])
def test_layouts_equal_one_process(base, method, layout):
    steps = dict(steps=3)
    name = "-".join(f"{k}{v}" for k, v in layout.items())
    one = align_config(base, f"{method}-one-{name}", method, optim=steps)
    align.align(one)
    expected = [(r["loss"], r["grad_norm"]) for r in metrics(one) if "grad_norm" in r]
    many = align_config(base, f"{method}-{name}", method, optim=steps, parallel=layout,
                        data=dict(micro_batch=2 if "dp" in layout else 4))
    got = spawn(2, run_in_layout, many)
    assert sum(got, ()) == pytest.approx(sum(expected, ()), rel=1e-4, abs=1e-6)


def test_resume_continues_exactly(base):
    import checkpoint
    steps = dict(steps=4, lr=3e-3, min_lr=3e-3)  # a constant rate: the first half's shorter run has the same
    full = align_config(base, "whole", "dpo", optim=steps, align=dict(reference="live"))
    align.align(full)
    half = align_config(base, "halves", "dpo", optim={**steps, "steps": 2}, align=dict(reference="live"))
    align.align(half)
    half = align_config(base, "halves", "dpo", optim=steps, align=dict(reference="live"))
    align.align(half, resume="latest")
    a = checkpoint.load_model(os.path.join(full.log.dir, "checkpoints", "step_0000004"))[1].state_dict()
    b = checkpoint.load_model(os.path.join(half.log.dir, "checkpoints", "step_0000004"))[1].state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r["loss"] for r in metrics(full) if "grad_norm" in r] == [r["loss"] for r in metrics(half)
                                                                     if "grad_norm" in r]


def test_starts_from_a_hugging_face_directory(base):
    """init_from may be a Hugging Face directory (here the base model exported): the model's
    config and tokenizer come from it, and the run starts from its weights."""
    import checkpoint
    hf = str(base["dir"] / "hf")
    checkpoint.export_hf(base["ckpt"], hf)
    cfg = align_config(base, "from-hf", "rm", optim=dict(steps=2), train=dict(init_from=hf))
    align.align(cfg)
    val = [r for r in metrics(cfg) if "val_loss" in r]
    assert val[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)  # the new value head starts at zero
    ours = checkpoint.load_model(os.path.join(cfg.log.dir, "checkpoints", "step_0000002"))[1]
    assert ours.cfg.value_head and ours.cfg.d_model == 32
