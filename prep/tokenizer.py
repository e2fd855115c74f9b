"""Byte-level BPE tokenizer training with the `tokenizers` library.

Byte-level: text is split into UTF-8 bytes before merges are learnt, so every string encodes (no unknown token) and
decoding gives back the exact input, whitespace and any Unicode included. Digits are split one by one (Llama, PaLM)
so numbers are spelled out digit by digit instead of as arbitrary merged chunks.
"""
import hashlib
import random
from collections import Counter

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# Ids 0..6, in this order: data.py and align.py rely on these strings, not on the ids.
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
BOS, EOS, PAD = SPECIAL_TOKENS[:3]

# The one chat format: alignment and inference render conversations with this Jinja template (run as transformers'
# apply_chat_template runs it), and the Hugging Face export ships it, so a model is trained and served on the same
# text. <|bos|> once, then <|role|>content<|end|> per {"role", "content"} message; add_generation_prompt opens the
# assistant's turn. An unknown role is an error, not text that would look like a special token without being one.
CHAT_TEMPLATE = (
    "<|bos|>{% for m in messages %}"
    "{% if m['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('unknown chat role ' ~ m['role'] ~ ': use system, user or assistant') }}{% endif %}"
    "{{ '<|' ~ m['role'] ~ '|>' ~ m['content'] ~ '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHAT_ROLES = ("system", "user", "assistant")


def chat_text(messages, add_generation_prompt=True):
    """CHAT_TEMPLATE rendered in Python (the same text as transformers' apply_chat_template on an
    export): messages [{"role": ..., "content": ...}] -> the text to encode, ending with
    <|assistant|> so the model writes the next turn. A ValueError names a bad message."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: want {{'role': one of {', '.join(CHAT_ROLES)}, 'content': text}}")
    turns = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
    return BOS + turns + ("<|assistant|>" if add_generation_prompt else "")

# The GPT-4 (cl100k) pre-tokenisation pattern with \p{N} alone instead of \p{N}{1,3}:
# words with their leading space, single digits, punctuation runs, newlines, whitespace.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")


def sample_texts(docs, max_chars, seed=0, total_chars=None):
    """A sample of about max_chars drawn across the whole corpus (not its first files):
    each document is kept with probability max_chars / total_chars."""
    p = 1.0 if not total_chars else min(1.0, max_chars / total_chars)
    rng = random.Random(seed)
    return (doc["text"] for doc in docs if rng.random() < p)


def train_tokenizer(texts, vocab_size, min_frequency=2):
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is below 256 bytes + {len(SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def describe(tok, texts, n_longest=10):
    """Figures for a report: bytes per token on `texts`, the longest tokens, and the least used ones on `texts`
    (long or unused tokens — repeated separators, boilerplate, mojibake — betray junk in the training corpus)."""
    n_bytes = sum(len(t.encode()) for t in texts)
    counts = Counter(i for e in tok.encode_batch(texts, add_special_tokens=False) for i in e.ids)
    ids = [i for i in range(tok.get_vocab_size()) if tok.id_to_token(i) not in SPECIAL_TOKENS]
    longest = sorted(ids, key=lambda i: -len(tok.id_to_token(i)))[:n_longest]  # one char per byte
    rarest = sorted(ids, key=lambda i: (counts[i], -len(tok.id_to_token(i))))[:n_longest]
    return {"vocab_size": tok.get_vocab_size(), "bytes_per_token": n_bytes / max(sum(counts.values()), 1),
            "longest_tokens": [tok.decode([i]) for i in longest],
            "least_used_tokens": [[tok.decode([i]), counts[i]] for i in rarest],
            "unused_tokens": sum(counts[i] == 0 for i in ids)}
