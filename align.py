"""align.py — post-training on the pretraining machinery: supervised fine-tuning, a reward
model, DPO and its variants, and on-policy RL (RLOO, GRPO, PPO).

    python align.py --config configs/sft-tiny.toml [--set align.beta=0.2 ...] [--resume auto]
    torchrun --nproc-per-node 2 align.py --config configs/dpo-tiny.toml
    python align.py --demo-data DIR     # the demo's synthetic chat and preference sets

The path the field walked, in order. RLHF with PPO (Ouyang et al. 2022) keeps four models:
policy, value, reward and reference (here the value is a head on the policy). DPO (Rafailov
et al. 2023) needs two, and its loss is close to language modelling. RLOO (Ahmadian et al.
2024) and GRPO (Shao et al. 2024) go back to REINFORCE, the other samples of the same prompt
serving as the baseline instead of a learnt value. Each method here is a loss over a batch
(`sft_loss`, `rm_loss`, `dpo_step`, `rl_loss`); the loop (`align`) is the same for all and
reuses train.py's model building, optimizer, checkpoints and resume, and infer.py's
`generate` for rollouts. [model] is the config of train.init_from, the model aligned.
Layouts: dp (ZeRO 0-3) for all; tp too for sft, rm and dpo. pp and cp are refused: the
objectives need each whole sequence's log-probability on one rank.
"""
import argparse
import dataclasses
import functools
import glob
import gzip
import importlib
import json
import os
import random
import re
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
import parallel
import train
from config import ConfigError, load_config
from infer import generate, stop_ids
from model import document_starts
from prep.tokenizer import BOS, CHAT_ROLES, PAD, chat_text

RL = ("rloo", "grpo", "ppo")
PAIRS = ("rm", "dpo")


# ----------------------------------------------------------------------------------------
# Reading examples: chat, preference and prompt layouts, each error naming its file and line

def read_rows(pattern):
    """[(where, row)] of every .jsonl (one object per line, .gz too) or .json (a list) file
    matching pattern; `where` is the file and line (or item) that errors name."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise ValueError(f"{pattern}: no such file")
    out = []
    for path in paths:
        try:
            with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable ({e})") from None
        try:
            if path.endswith(".json"):
                rows = json.loads(text)
                if not isinstance(rows, list):
                    raise ValueError(f"{path}: expected a JSON list of examples")
                out += [(f"{path}: item {i + 1}", r) for i, r in enumerate(rows)]
                continue
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    where = f"{path}:{i}"
                    out.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{where if not path.endswith('.json') else path}: invalid JSON ({e.msg})") from None
    return out


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def checked(messages, where):
    """messages, if they render with the chat template (prep.tokenizer.chat_text), else a
    ValueError naming where and the bad message."""
    try:
        if not isinstance(messages, list) or not messages:
            raise ValueError("expected a non-empty list of messages")
        chat_text(messages)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return messages


def conversation(row, where):
    """The messages of a chat example: {"messages": [{"role", "content"}]} (OpenAI's layout),
    {"conversations": [{"from", "value"}]} (ShareGPT) or {"instruction", "input", "output"}
    (Alpaca, an optional "system")."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object")
    if "messages" in row:
        return checked(row["messages"], where)
    if "conversations" in row:
        turns = row["conversations"] if isinstance(row["conversations"], list) else None
        return checked(turns and [{"role": SHAREGPT_ROLES.get(t.get("from")) if isinstance(t, dict) else None,
                                   "content": t.get("value") if isinstance(t, dict) else None} for t in turns], where)
    if isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return checked(system + [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}],
                       where)
    raise ValueError(f"{where}: a chat example needs messages, conversations, or instruction and output")


def hh_turns(text, where):
    """Anthropic HH-RLHF's transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages."""
    parts = re.split(r"\n\n(Human|Assistant): ?", "\n\n" + text.lstrip("\n"))
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"{where}: expected a transcript of Human: and Assistant: turns")
    return [{"role": "user" if r == "Human" else "assistant", "content": c.strip()}
            for r, c in zip(parts[1::2], parts[2::2])]


def answer(value, where):
    """A completion given as text, as a message, or as a conversation ending with it."""
    if isinstance(value, list) and value:
        value = value[-1]
    if isinstance(value, dict):
        value = value.get("content", value.get("value"))
    if not isinstance(value, str):
        raise ValueError(f"{where}: chosen and rejected must be text, a message or messages")
    return value


def preference(row, where):
    """(prompt messages, chosen text, rejected text) of a pair in any layout read: {"prompt",
    "chosen", "rejected"} with text or messages (UltraFeedback's chosen and rejected hold the
    prompt's turns too), ShareGPT's {"conversations", "chosen", "rejected"}, or HH-RLHF's
    {"chosen", "rejected"} transcripts that differ in the last assistant turn only."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        raise ValueError(f"{where}: a preference pair needs chosen and rejected")
    chosen, rejected = row["chosen"], row["rejected"]
    if "conversations" in row:
        prompt = conversation({"conversations": row["conversations"]}, where)
    elif isinstance(row.get("prompt"), str):
        prompt = [{"role": "user", "content": row["prompt"]}]
    elif "prompt" in row:
        prompt = row["prompt"]
    elif isinstance(chosen, str) and isinstance(rejected, str):  # HH-RLHF
        turns, other = hh_turns(chosen, where), hh_turns(rejected, where)
        if turns[-1]["role"] != "assistant" or turns[:-1] != other[:-1]:
            raise ValueError(f"{where}: chosen and rejected must share the transcript up to its last Assistant turn")
        prompt, chosen, rejected = turns[:-1], turns[-1]["content"], other[-1]["content"]
    elif isinstance(chosen, list) and len(chosen) > 1:  # UltraFeedback without a prompt key
        prompt = chosen[:-1]
    else:
        raise ValueError(f"{where}: no prompt (prompt, conversations, or an HH-RLHF transcript)")
    return checked(prompt, where), answer(chosen, where), answer(rejected, where)


def prompt_of(row, where):
    """The messages of an RL prompt: {"prompt": text or messages}, {"messages"} or GSM8K's
    {"question", "answer"}; the row goes to the reward function with the completion."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object")
    prompt = row.get("prompt", row.get("question", row.get("messages")))
    return checked([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt, where)


# ----------------------------------------------------------------------------------------
# Tokens: the chat template's ids, what is trained on, packing

def special_ids(tok, where):
    ids = {t: tok.token_to_id(t) for t in (BOS, PAD, "<|end|>", *(f"<|{r}|>" for r in CHAT_ROLES))}
    if None in ids.values():
        raise ValueError(f"{where}: the tokenizer lacks {[t for t, i in ids.items() if i is None]}: align needs "
                         "prep's chat special tokens (prep/tokenizer.py SPECIAL_TOKENS)")
    return ids


def chat_ids(tok, messages, generation_prompt=False):
    """(ids, labels) of chat_text(messages): the labels are the tokens of assistant turns, their
    <|end|> included (the model learns to stop), -100 elsewhere. Each turn is encoded alone:
    tokenizers split text at special tokens anyway, so the ids equal encoding the whole text."""
    sp = special_ids(tok, "tokenizer")
    ids, labels = [sp[BOS]], [-100]
    for m in messages:
        body = tok.encode(m["content"], add_special_tokens=False).ids + [sp["<|end|>"]]
        ids += [sp[f"<|{m['role']}|>"]] + body
        labels += [-100] + (body if m["role"] == "assistant" else [-100] * len(body))
    if generation_prompt:
        ids, labels = ids + [sp["<|assistant|>"]], labels + [-100]
    return ids, labels


def pair_ids(tok, prompt, chosen, rejected):
    """(ids, labels) of prompt + chosen and of prompt + rejected, labels on the answers."""
    head = chat_ids(tok, prompt, generation_prompt=True)[0]
    end = tok.token_to_id("<|end|>")
    bodies = [tok.encode(text, add_special_tokens=False).ids + [end] for text in (chosen, rejected)]
    return [(head + body, [-100] * len(head) + body) for body in bodies]


def fit(rows, limit, counter):
    """Rows cut to limit tokens (the inputs' seq_len + 1), counted in counter["truncated"]."""
    counter["truncated"] += sum(len(ids) > limit for ids, _ in rows)
    return [(ids[:limit], labels[:limit]) for ids, labels in rows]


def pack(rows, limit):
    """Conversations packed in order into rows of at most limit tokens (a new row when the next
    does not fit). Each starts with <|bos|>, where attention and positions restart
    (data.doc_mask's masking), so a conversation sees what it would see alone."""
    packed = []
    for ids, labels in rows:
        if packed and len(packed[-1][0]) + len(ids) <= limit:
            packed[-1] = (packed[-1][0] + ids, packed[-1][1] + labels)
        else:
            packed.append((ids, labels))
    return packed


def collate(rows, pad_id, device):
    """(inputs, targets), right-padded to the longest row: targets are labels shifted by one."""
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        x[i, :len(ids) - 1], y[i, :len(ids) - 1] = torch.tensor(ids[:-1]), torch.tensor(labels[1:])
    return x.to(device), y.to(device)


class Examples:
    """Items in a fresh seeded order each epoch. Step s takes the next micro_batch x grad_accum
    x dp of them, each rank its own slices: the position is the step, so a resume needs no
    other state (the item count is checked against the checkpoint's)."""

    def __init__(self, items, d, dp_rank, dp):
        self.items, self.d, self.rank, self.dp = items, d, dp_rank, dp

    def batches(self, step):
        """This rank's grad_accum micro-batches of step."""
        n, b = len(self.items), self.d.micro_batch
        starts = [(step * self.d.grad_accum + k) * b * self.dp + self.rank * b for k in range(self.d.grad_accum)]
        return [[self.items[self.order(i // n)[i % n]] for i in range(at, at + b)] for at in starts]

    @functools.lru_cache(maxsize=2)
    def order(self, epoch):
        return torch.randperm(len(self.items), generator=torch.Generator().manual_seed(self.d.seed + epoch)).tolist()

    def state_dict(self):
        return {"items": len(self.items)}

    def load_state_dict(self, state):
        if state["items"] != len(self.items):
            raise ValueError(f"align.train holds {len(self.items)} examples, the checkpoint's run had "
                             f"{state['items']}: resume with the same data")


# ----------------------------------------------------------------------------------------
# The objectives. Each returns (the sum of its per-unit losses, {metric: sum}) over a batch;
# `update` divides by the global count of units (tokens, pairs, sequences), so any split over
# micro-steps and ranks gives the single-process mean.

def logps(model, x, y, doc_starts=None, values=False):
    """(B, S) log-probabilities of the targets (0 where ignored), and the values if asked."""
    return model(x, y, doc_starts=doc_starts, per_token=True, values=values)


def sft_loss(run, batch):
    """Cross-entropy on the assistant tokens: a token-level mean over the global batch."""
    x, y = batch
    nll = -logps(run.model, x, y, document_starts(x, run.extra["bos"]) if run.extra["pack"] else None).sum()
    return nll, {}


def last_index(y):
    """The position of each row's last target (the answer's <|end|>): where a reward model scores."""
    at = torch.arange(y.shape[1], device=y.device)
    return torch.where(y != -100, at, -1).max(1).values


def rm_loss(run, batch):
    """Bradley-Terry (Ouyang et al. 2022, eq. 1): -log sigmoid(r(chosen) - r(rejected)), the
    scalar r read at each answer's last token; rows are chosen answers, then rejected ones."""
    x, y = batch
    scores = run.model(x, values="only")
    r = scores.gather(1, last_index(y)[:, None]).squeeze(1)
    chosen, rejected = r.chunk(2)
    return -F.logsigmoid(chosen - rejected).sum(), {"accuracy": (chosen > rejected).float().sum(),
                                                    "margin": (chosen - rejected).detach().sum()}


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta=0.1, loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair losses and implicit rewards beta * log(pi / ref) of chosen and rejected:
    sigmoid: DPO (Rafailov et al. 2023, eq. 7), with label smoothing cDPO (Mitchell 2023, eq. 3:
        the labels are taken as flipped with probability label_smoothing);
    ipo: (h - 1 / (2 beta))^2, IPO (Azar et al. 2023, eq. 17), on length-averaged log-probs;
    hinge: max(0, 1 - beta h), SLiC's calibration loss (Zhao et al. 2023);
    h = log-ratio of chosen over rejected, policy minus reference."""
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"loss_type={loss_type!r}: choose sigmoid, ipo or hinge")
    return (losses, beta * (policy_chosen_logps - ref_chosen_logps).detach(),
            beta * (policy_rejected_logps - ref_rejected_logps).detach())


def pair_logps(model, x, y, average):
    """(chosen, rejected) summed (or, for IPO, length-averaged) answer log-probabilities."""
    lp = logps(model, x, y).sum(1)
    if average:
        lp = lp / (y != -100).sum(1)
    return lp.chunk(2)


def dpo_step(run, batch):
    x, y, ref = batch
    a = run.cfg.align
    if ref is None:  # live: the frozen reference model, every step
        with torch.no_grad():
            ref = torch.stack(pair_logps(run.extra["reference"], x, y, a.loss == "ipo"), 1)
    chosen, rejected = pair_logps(run.model, x, y, a.loss == "ipo")
    losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], a.beta, a.loss,
                                            a.label_smoothing)
    return losses.sum(), {"rewards/chosen": r_chosen.sum(), "rewards/rejected": r_rejected.sum(),
                          "margin": (r_chosen - r_rejected).sum(), "accuracy": (r_chosen > r_rejected).float().sum()}


def rl_loss(run, batch):
    """The policy's clipped surrogate (PPO, Schulman et al. 2017, eq. 7) on every completion
    token, averaged per sequence: with one pass over fresh rollouts the ratio is 1 and it is
    REINFORCE's gradient. GRPO adds the k3 estimate of KL(policy || reference) to the loss
    (Shao et al. 2024, eq. 4); RLOO and PPO put the KL penalty into the reward instead. PPO
    adds its clipped value loss (as OpenAI's baselines and TRL clip it)."""
    a, r = run.cfg.align, batch
    mask = (r["y"] != -100).float()
    out = logps(run.model, r["x"], r["y"], values=a.method == "ppo")
    lp, values = out if a.method == "ppo" else (out, None)
    ratio = torch.exp(lp - r["old"])
    loss = -torch.min(ratio * r["adv"], ratio.clamp(1 - a.clip, 1 + a.clip) * r["adv"])
    if a.method == "grpo":
        d = r["ref"] - lp
        loss = loss + a.beta * (torch.exp(d) - d - 1)
    if a.method == "ppo":
        clipped = r["values"] + (values - r["values"]).clamp(-a.clip, a.clip)
        loss = loss + a.vf_coef * 0.5 * torch.max((values - r["returns"]) ** 2, (clipped - r["returns"]) ** 2)
    per_seq = (loss * mask).sum(1) / mask.sum(1)
    return per_seq.sum(), {"clipped": (((ratio - 1).abs() > a.clip).float() * mask).sum(1).div(mask.sum(1)).sum()}


OBJECTIVES = {"sft": sft_loss, "rm": rm_loss, "dpo": dpo_step, "rloo": rl_loss, "grpo": rl_loss, "ppo": rl_loss}


def units(method, batch):
    """What the loss averages over: target tokens (sft), pairs, or sequences (rl)."""
    if method == "sft":
        return (batch[1] != -100).sum().item()
    return len(batch[0]) // 2 if method in PAIRS else len(batch["x"])


# ----------------------------------------------------------------------------------------
# On-policy rollouts: generate, score, advantages

def reward_function(spec):
    """module:function from align.reward, called as function(completion text, example row)."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"align.reward = {spec!r}: not a checkpoint directory or an importable "
                          f"module:function ({e})") from None


def gsm8k_reward(completion, example):
    """1 when the completion's last number equals the one after GSM8K's "####" (commas and a
    trailing .0 ignored), else 0: a verifiable reward, as in RL with verifiable rewards
    (Lambert et al. 2024, Tülu 3) and GRPO's maths training."""
    def number(s):
        s = s.replace(",", "").rstrip(".")
        return s[:-2] if s.endswith(".0") else s
    want = str(example.get("answer", "")).split("####")[-1].strip()
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", completion)
    return float(bool(found) and number(found[-1]) == number(want))


def list_format_reward(completion, example):
    """The demo's verifiable reward (demo_data): half for the share of the prompt's names in the
    answer, half for the format "a, b, c." (commas, a final period); 1 for the exact answer."""
    names = example["prompt"].removeprefix("List these names: ").split()
    text = completion.strip()
    found = len(set(re.findall(r"\w+", text)) & set(names)) / len(names)
    return 0.5 * found + 0.5 * bool(re.fullmatch(r"\w+(, \w+)*\.", text))


def complete(run, examples, temperature, seed=None):
    """A completion of each example's prompt (infer.generate, stopping at <|end|>) and its
    reward: the reward model's score at the last token, or the reward function's. Returns
    (rows of prompt + completion ids with labels on the completion, rewards)."""
    tok, stops = run.extra["tok"], run.extra["stops"]
    prompts = [chat_ids(tok, prompt_of(e, "prompt"), generation_prompt=True)[0] for e in examples]
    with run.autocast:
        completions = generate(run.model, prompts, run.cfg.align.max_new_tokens, temperature, stop_ids=stops,
                               seed=seed)
    rows = [(p + c, [-100] * len(p) + c) for p, c in zip(prompts, completions)]
    reward = run.extra["reward"]
    if not isinstance(reward, torch.nn.Module):
        texts = [tok.decode([t for t in c if t not in stops]) for c in completions]
        return rows, torch.tensor([float(reward(t, e)) for t, e in zip(texts, examples)], device=run.device)
    x, y = collate(rows, run.extra["pad"], run.device)
    with torch.no_grad(), run.autocast:
        return rows, reward(x, values="only").gather(1, last_index(y)[:, None]).squeeze(1)


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16) along each row's tokens:
    A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, 0 past the end."""
    adv, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        going = mask[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        next_value = values[:, t + 1] * going if t + 1 < rewards.shape[1] else 0.0
        last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * going * last
        adv[:, t] = last
    return adv * mask


def global_mean_std(t, mask, group):
    """Mean and std of t's masked entries over every data-parallel rank."""
    s = torch.stack([(t * mask).sum(), (t * t * mask).sum(), mask.sum()])
    s = parallel.all_reduce(s, group)
    mean = s[0] / s[2]
    return mean, (s[1] / s[2] - mean ** 2).clamp(min=0).sqrt()


def rollout(run, examples, seed):
    """k completions of each prompt (one generate call), their rewards, and what the loss needs:
    the policy's and reference's log-probs, and the advantage of every completion token."""
    a = run.cfg.align
    examples = [e for e in examples for _ in range(a.samples)]
    rows, reward = complete(run, examples, a.temperature, seed)
    x, y = collate(rows, run.extra["pad"], run.device)
    mask = (y != -100).float()
    with torch.no_grad(), run.autocast:
        out = logps(run.model, x, y, values=a.method == "ppo")
        old, values = out if a.method == "ppo" else (out, None)
        ref = logps(run.extra["reference"], x, y)
    kl = ((old - ref) * mask).sum(1)  # the sequence's KL(policy || reference), estimated on its tokens
    if a.method == "ppo":  # a per-token KL penalty, the score at the last token; advantages whitened
        rewards = -a.beta * (old - ref) * mask
        rewards[torch.arange(len(rows)), last_index(y)] += reward
        adv = gae(rewards, values * mask, mask, a.gamma, a.lam)
        returns = adv + values
        mean, std = global_mean_std(adv, mask, run.grid.groups.get("dp_cp"))
        adv = (adv - mean) / (std + 1e-8) * mask
    else:
        r = (reward - a.beta * kl if a.method == "rloo" else reward).view(-1, a.samples)
        if a.method == "rloo":  # each sample's baseline: the mean reward of the others (Ahmadian et al. 2024, eq. 8)
            adv = r - (r.sum(1, keepdim=True) - r) / max(a.samples - 1, 1)
        else:  # grpo: normalised within the group (Shao et al. 2024, section 4.1.2)
            adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=a.samples > 1) + 1e-4)
        adv, returns = adv.flatten()[:, None].expand_as(old) * mask, None
    batch = {"x": x, "y": y, "old": old, "ref": ref, "adv": adv, "values": values, "returns": returns}
    stats = {"reward": reward.sum(), "kl": kl.sum(), "length": mask.sum()}
    return batch, stats


# ----------------------------------------------------------------------------------------
# Starting, the update, the loop

def model_config(cfg):
    """[model] of train.init_from (a checkpoint or a Hugging Face directory), with the value
    head the method needs."""
    path = cfg.train.init_from
    if not path:
        raise ConfigError("train.init_from: align starts from a model: a checkpoint or a Hugging Face directory")
    if os.path.exists(os.path.join(path, "config.json")):
        saved = checkpoint.read_hf_config(path)
    elif os.path.exists(os.path.join(path, "config.toml")):
        saved = load_config(os.path.join(path, "config.toml")).model
    else:
        raise ConfigError(f"train.init_from = {path!r}: neither a checkpoint nor a Hugging Face directory")
    saved.value_head = cfg.align.method in ("rm", "ppo")
    if cfg.data.seq_len >= saved.max_seq_len:
        raise ConfigError(f"data.seq_len = {cfg.data.seq_len}: must be below the model's max_seq_len "
                          f"{saved.max_seq_len} (rows hold seq_len + 1 tokens)")
    return saved


def check_align_layout(cfg):
    p, a = cfg.parallel, cfg.align
    if p.pp > 1 or p.cp > 1 or p.sequence_parallel:
        raise ConfigError("parallel.pp, cp and sequence_parallel: alignment runs under dp and tp only (each "
                          "sequence's log-probability is needed whole on one rank)")
    if a.method in RL and (p.tp > 1 or p.zero == 3):
        raise ConfigError(f"align.method = {a.method!r} with parallel.tp or zero = 3: rollouts generate on each "
                          "rank alone, so RL runs under dp with ZeRO 0-2")
    if a.method == "dpo" and not a.beta > 0:
        raise ConfigError(f"align.beta = {a.beta}: DPO's beta must be above 0 (it scales the implicit reward)")
    if a.method in RL and not a.reward:
        raise ConfigError("align.reward: RL needs a reward model checkpoint or a module:function")
    if not a.train:
        raise ConfigError("align.train: the examples to align on (a .jsonl or .json file, or a glob)")


def load_items(cfg, tok, pattern, counter):
    """The examples of pattern in the method's form: rows of ids and labels (sft: packed when
    align.pack), pairs of rows (rm, dpo), or prompt rows (rl)."""
    a, limit = cfg.align, cfg.data.seq_len + 1
    rows = read_rows(pattern)
    if a.method == "sft":
        items = fit([chat_ids(tok, conversation(r, w)) for w, r in rows], limit, counter)
        return pack(items, limit) if a.pack else items
    if a.method in PAIRS:  # (chosen row, rejected row, index: where its reference log-probs are)
        return [(*fit(pair_ids(tok, *preference(r, w)), limit, counter), i) for i, (w, r) in enumerate(rows)]
    for w, r in rows:
        prompt_of(r, w)
    return [r for _, r in rows]


def start(cfg, resume=None, start_over=False):
    """train.py's run (model, dp, optimizer, checkpoint writer, log) over the alignment data,
    with run.extra holding what the method adds: tokenizer, reference model, reward."""
    from tokenizers import Tokenizer
    check_align_layout(cfg)
    cfg.model = model_config(cfg)
    tok_path = os.path.join(cfg.train.init_from, "tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    sp = special_ids(tok, tok_path)
    counter = {"truncated": 0}
    items = load_items(cfg, tok, cfg.align.train, counter)
    val = load_items(cfg, tok, cfg.align.val, counter) if cfg.align.val else []
    rank, world, local_rank = parallel.init_distributed()
    device, autocast = train.setup_device(cfg, local_rank)
    grid = parallel.make_grid(cfg.parallel, cfg.model, cfg.data)
    ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.log.dir, "checkpoints")
    begin = train.on_rank0(functools.partial(train.prepare_run_dir, cfg, ckpt_dir, resume, start_over), rank == 0)
    model, dp, named, optimizer = train.build(cfg, grid, device, begin or cfg.train.init_from)
    run = train.Run(cfg, grid, device, autocast, model, dp, named, optimizer, Examples(items, cfg.data, grid.dp_rank,
                    grid.dp), {}, None, None, train.MetricsLog(cfg.log.dir, rank == 0, cfg.log.backends, cfg),
                    checkpoint.CheckpointWriter(cfg.checkpoint.asynchronous), ckpt_dir, rank == 0)
    run.extra.update({"tok": tok, "bos": sp[BOS], "pad": sp[PAD], "pack": cfg.align.pack, "stops": stop_ids(tok),
                      "val": val, "reference": None, "reward": None})
    a = cfg.align
    if a.method in RL or a.method == "dpo":
        run.extra["reference"] = reference_model(cfg, grid, device)
    if a.method == "dpo" and a.reference == "precomputed":  # the reference is needed once, then freed
        run.extra["ref_logps"], run.extra["val_ref_logps"] = (reference_logps(run, part) for part in (items, val))
        run.extra["reference"] = None
    if a.method in RL:
        reward = a.reward
        run.extra["reward"] = (checkpoint.load_model(reward, device)[1].eval().requires_grad_(False)
                               if os.path.isdir(reward) else reward_function(reward))
    if begin:
        train.restore(run, begin, weights=False)
        run.log.rewind(run.step)
    if rank == 0:
        print(f"align: {a.method} on {len(items)} {'rows' if a.method == 'sft' else 'examples'} "
              f"({counter['truncated']} cut to data.seq_len + 1 = {cfg.data.seq_len + 1} tokens), "
              f"{len(val)} held out; {world} process(es) on {device}" + (f", resumed from {begin}" if begin else ""))
    return run


def reference_model(cfg, grid, device):
    """The frozen model the policy is kept near: init_from's weights as a language model, in
    the policy's tensor-parallel layout."""
    ref_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, value_head=False))
    return checkpoint.build_model(ref_cfg, device, cfg.train.init_from, grid).eval().requires_grad_(False)


@torch.no_grad()
def reference_logps(run, items):
    """DPO's reference log-probs of every pair, computed once: (n, 2). Every rank computes all
    of them (the same forwards in the same order, as ZeRO-3 and tp need); a resume recomputes
    them from the same weights, so it continues exactly."""
    out, b = [], run.cfg.data.micro_batch
    for i in range(0, len(items), b):
        chunk = items[i:i + b]
        x, y = collate([p[0] for p in chunk] + [p[1] for p in chunk], run.extra["pad"], run.device)
        with run.autocast:
            out.append(torch.stack(pair_logps(run.extra["reference"], x, y, run.cfg.align.loss == "ipo"), 1).float())
    return torch.cat(out) if out else torch.zeros(0, 2, device=run.device)


def make_batches(run, step, items=None):
    """This rank's micro-batches of a step (sft, rm, dpo), or of the validation items."""
    a, pad, device, b = run.cfg.align, run.extra["pad"], run.device, run.cfg.data.micro_batch
    raw = run.loader.batches(step) if items is None else [items[i:i + b] for i in range(0, len(items), b)]
    out = []
    for batch in raw:
        if a.method == "sft":
            out.append(collate(batch, pad, device))
            continue
        x, y = collate([p[0] for p in batch] + [p[1] for p in batch], pad, device)
        if a.method == "rm":
            out.append((x, y))
        else:
            table = run.extra.get("val_ref_logps" if items else "ref_logps")  # None: live
            out.append((x, y, None if table is None else table[torch.tensor([p[2] for p in batch], device=device)]))
    return out


def update(run, batches):
    """One optimizer step over this rank's micro-batches: each micro-step's summed loss is
    divided by the count of units (tokens, pairs, sequences) over all micro-steps and ranks,
    and multiplied by dp (the gradient all-reduce averages), so every layout takes the
    single-process mean. Returns (loss, {metric: mean}, grad norm)."""
    method, group, dp = run.cfg.align.method, run.grid.groups.get("dp_cp"), run.grid.dp
    total = parallel.all_reduce(torch.tensor(float(sum(units(method, b) for b in batches)), device=run.device), group)
    loss_sum, metrics = torch.zeros((), device=run.device), {}
    for k, batch in enumerate(batches):
        run.dp.sync = k == len(batches) - 1
        with run.autocast:
            loss, stats = OBJECTIVES[method](run, batch)
        (loss * dp / total).backward()
        run.dp.settle()
        loss_sum += loss.detach().float()
        for name, v in stats.items():
            metrics[name] = metrics.get(name, 0.0) + v.detach().float()
    parallel.finish_grads(run.model, run.grid, run.dp)
    grad_norm = parallel.clip_grad_norm(run.named, run.cfg.optim.clip, run.grid, run.dp.zero)
    run.optimizer.step()
    run.dp.after_step()
    run.dp.zero_grad(run.model)
    names = list(metrics)
    sums = parallel.all_reduce(torch.stack([loss_sum] + [metrics[n] for n in names]), group) / total
    return sums[0].item(), dict(zip(names, sums[1:].tolist())), float(grad_norm)


@torch.no_grad()
def validate(run):
    """The method's loss and metrics on the held-out examples (every rank all of them), or for
    RL the mean reward of greedy completions of the held-out prompts."""
    a, val = run.cfg.align, run.extra["val"]
    if not val:
        return
    if a.method in RL:
        rec = {"step": run.step, "val_reward": complete(run, val, 0.0)[1].mean().item()}
    else:
        batches = make_batches(run, None, val)
        total = sum(units(a.method, b) for b in batches)
        sums = {}
        for batch in batches:
            with run.autocast:
                loss, stats = OBJECTIVES[a.method](run, batch)
            for name, v in {"loss": loss, **stats}.items():
                sums[name] = sums.get(name, 0.0) + v.float().item()
        rec = {"step": run.step, **{f"val_{n}": v / total for n, v in sums.items()}}
    run.log.write(rec, f"step {run.step:>6} | " + " | ".join(f"{k} {v:.4f}" for k, v in rec.items() if k != "step"))
    return rec


def align(cfg, resume=None, start_over=False):
    """Align cfg.train.init_from with cfg.align.method; returns the model."""
    run = start(cfg, resume, start_over)
    a, o = cfg.align, cfg.optim
    if run.step == 0:
        validate(run)
    while run.step < o.steps:
        t0 = time.perf_counter()
        lr = train.lr_at(run.step, o)
        train.set_lr(run.optimizer, lr)
        stats = {}
        if a.method in RL:
            rank = dist.get_rank() if dist.is_initialized() else 0
            rolled = [rollout(run, b, seed=(cfg.data.seed * 1_000_003 + run.step) * 1009 + rank * 101 + k)
                      for k, b in enumerate(run.loader.batches(run.step))]
            batches = [b for b, _ in rolled]
            n = parallel.all_reduce(torch.tensor(float(sum(len(b["x"]) for b in batches)), device=run.device),
                                    run.grid.groups.get("dp_cp"))
            sums = {k: parallel.all_reduce(sum(s[k] for _, s in rolled).float(), run.grid.groups.get("dp_cp"))
                    for k in rolled[0][1]}
            stats = {k: (v / n).item() for k, v in sums.items()}
        else:
            batches = make_batches(run, run.step)
        for _ in range(a.ppo_epochs if a.method in RL else 1):
            loss, metrics, grad_norm = update(run, batches)
        run.step += 1
        dt = time.perf_counter() - t0
        run.counters["seconds"] += dt
        rec = {"step": run.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, **metrics, **stats,
               "elapsed_s": run.counters["seconds"]}
        if run.step % cfg.log.every == 0 or run.step == o.steps:
            run.log.write(rec, f"step {run.step:>6}/{o.steps} | " + " | ".join(
                f"{k} {v:.4f}" for k, v in rec.items() if k not in ("step", "lr", "elapsed_s")) + f" | {dt:.2f}s")
        if cfg.eval.val_every and run.step % cfg.eval.val_every == 0 and run.step < o.steps:
            validate(run)
        if cfg.checkpoint.every and run.step % cfg.checkpoint.every == 0 and run.step < o.steps:
            train.save(run)
    validate(run)
    train.save(run)
    error = run.writer.wait()
    if error:
        raise RuntimeError(f"the final checkpoint could not be written: {error}") from error
    if run.master:
        write_report(cfg)
    if dist.is_initialized():
        dist.barrier()
    return run.model


def write_report(cfg):
    """An alignment section appended to report.md: first and last training and held-out figures."""
    with open(os.path.join(cfg.log.dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "loss" in r and "event" not in r]
    vals = [r for r in records if any(k.startswith("val_") for k in r)]
    def figures(r):
        return ", ".join(f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float) and k not in ("lr", "elapsed_s"))
    lines = [f"## Alignment: {cfg.align.method}", "",
             f"- from `{cfg.train.init_from}` on `{cfg.align.train}`, {steps[-1]['step']} steps in "
             f"{train.fmt_time(steps[-1]['elapsed_s'])}",
             f"- step {steps[0]['step']}: {figures(steps[0])}", f"- step {steps[-1]['step']}: {figures(steps[-1])}"]
    if vals:
        lines += [f"- held out before: {figures(vals[0])}", f"- held out after: {figures(vals[-1])}"]
    with open(os.path.join(cfg.log.dir, "report.md"), "a") as f:
        f.write("\n" + "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------
# The demo's data: a formatting preference a tiny model can learn

def demo_data(out_dir, n=1000, seed=0):
    """Synthetic chat (sft) and preference (dpo) sets that need no download: the user asks for
    a few Python builtin names to be listed; an answer lists them either as "a, b, c." or as
    "a b c". SFT sees both formats equally often; DPO prefers the first (the rule: commas and
    a final period), as does list_format_reward for RL. Writes {sft,dpo,prompts}{,_val}.jsonl."""
    import builtins
    import keyword
    words = sorted({w for w in dir(builtins) if w.isidentifier() and not w.startswith("_")} | set(keyword.kwlist))
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    for split, count in (("", n), ("_val", max(n // 10, 8))):
        with open(os.path.join(out_dir, f"sft{split}.jsonl"), "w") as sft, \
                open(os.path.join(out_dir, f"dpo{split}.jsonl"), "w") as dpo, \
                open(os.path.join(out_dir, f"prompts{split}.jsonl"), "w") as prompts:
            for _ in range(count):
                picked = rng.sample(words, rng.randint(2, 4))
                prompt = "List these names: " + " ".join(picked)
                good, plain = ", ".join(picked) + ".", " ".join(picked)
                answer = rng.choice([good, plain])
                sft.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                   {"role": "assistant", "content": answer}]}) + "\n")
                dpo.write(json.dumps({"prompt": prompt, "chosen": good, "rejected": plain}) + "\n")
                prompts.write(json.dumps({"prompt": prompt}) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--resume", nargs="?", const="latest", help="auto, latest, a step number or a directory")
    p.add_argument("--start-over", action="store_true", help="move an earlier run in log.dir aside")
    p.add_argument("--demo-data", metavar="DIR", help="write the demo's synthetic sft and dpo sets into DIR, then exit")
    args = p.parse_args(argv)
    if args.demo_data:
        return demo_data(args.demo_data)
    if not args.config:
        p.error("--config is required")
    try:
        align(load_config(args.config, args.set), args.resume, args.start_over)
    except (ValueError, OSError) as e:  # bad input: one line naming what to fix
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
