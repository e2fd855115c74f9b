"""infer.py — generation: a KV cache, sampling, stop tokens and strings, streaming, int8/int4
weights, speculative decoding, compiled decode; a command line and a chat.

    python infer.py --checkpoint DIR --prompt "def " [--max-new-tokens 80 --temperature 0.8 --top-k 50]
    python infer.py --checkpoint DIR --chat                      # multi-turn, the tokenizer's chat format
    python infer.py --checkpoint DIR --quantize int8 --save-quantized DIR_Q   # quantize once, load with --checkpoint
    python infer.py --checkpoint DIR --draft SMALL_DIR --prompt "..."        # speculative decoding
    python infer.py --serve --checkpoint DIR --port 8000         # OpenAI-compatible API, chat page at /

The shape of gpt-fast: `prefill` runs the prompts through the model once, filling each layer's KVCache;
`decode_one_token` runs one position; `generate` loops it, sampling with `sample`; `speculative_decode` lets a
small draft propose tokens that the model checks in one forward. Prompts of different lengths are left-padded:
each row's text starts at its own position (`model.document_starts`' mechanism), attention stays inside it and
RoPE positions restart there, so a row gets what it would get alone.
"""
import argparse
import contextlib
import functools
import json
import os
import shutil
import time

import torch
import torch.nn as nn

import checkpoint
import data
import fused
from config import Config, DataConfig, load_config, number, to_toml
from model import KVCache, MambaCache, Transformer
from prep.tokenizer import BOS, EOS, chat_text


# ----------------------------------------------------------------------------------------
# The KV cache, prefill and one decode step

def setup_caches(model, batch, max_len):
    """A KVCache of max_len positions in every attention layer, a MambaCache (fixed-size state) in every Mamba layer."""
    p, c = next(model.parameters()), model.cfg
    for block in model.layers:
        if hasattr(block, "attn"):
            block.attn.cache = KVCache(batch, c.n_kv_heads, max_len, c.head_dim, p.dtype, p.device)
        else:
            block.mamba.cache = MambaCache(batch, c, p.dtype, p.device)


def clear_caches(model):
    for block in model.layers:
        (block.attn if hasattr(block, "attn") else block.mamba).cache = None


def prefill(model, ids, starts):
    """ids (B, S) left-padded prompts; starts (B,): where each row's text begins. Fills the
    caches for positions 0..S-1; returns the logits at the last position (B, vocab)."""
    pos = torch.arange(ids.shape[1], device=ids.device)
    return model(ids, pos=pos, doc_starts=starts[:, None].expand_as(ids))[:, -1].float()


def decode_one_token(model, token, pos, starts):
    """token (B, 1) at cache position pos (1,) -> logits (B, vocab). The same shapes every step:
    the function to compile (and, on CUDA, to capture as a graph)."""
    return model(token, pos=pos, doc_starts=starts[:, None])[:, -1].float()


@functools.cache
def compiled_step(how):
    """decode_one_token compiled once per mode ("compile", or "graphs": also replayed as a CUDA
    graph); a cache of the model's whole context keeps its shapes fixed (gpt-fast's recipe)."""
    return torch.compile(decode_one_token, mode="reduce-overhead" if how == "graphs" else None, dynamic=False)


# ----------------------------------------------------------------------------------------
# Sampling

def sample(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """Next ids (B,) from logits (B, V): greedy at temperature 0; else the softmax of logits / temperature cut to the
    top_k most likely and to the smallest set reaching top_p (nucleus sampling, Holtzman et al. 2020)."""
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(probabilities(logits, temperature, top_k, top_p), 1, generator=generator).squeeze(-1)


def probabilities(logits, temperature, top_k=0, top_p=1.0):
    """The distribution sample() draws from (speculative decoding compares two of them)."""
    logits = logits / max(temperature, 1e-5)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # the mass before a token already reaches top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def penalize(logits, seen, penalty):
    """The repetition penalty (Keskar et al. 2019, CTRL; transformers' convention): logits of tokens already in
    the row (seen (B, V) bool) are divided by penalty when positive, multiplied when negative."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


# ----------------------------------------------------------------------------------------
# Generation

@torch.no_grad()
def generate_stream(model, prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                    stop_ids=(), stop_strings=(), decode=None, seed=None, compile="none"):
    """Yield, after each decode step, the list of (row, new token id) the step added; rows that finished (a stop
    id, a stop string, max_new_tokens) add nothing more; the token that ends a row is its last. prompts: token-id
    lists of any lengths (each non-empty). decode: ids -> text, for stop strings. compile: "none", "compile"
    (torch.compile the decode step) or "graphs" (also replay it as a CUDA graph: no CPU launch overhead per kernel)."""
    device, limit = next(model.parameters()).device, model.cfg.max_seq_len
    if any(not p for p in prompts) or max(map(len, prompts)) + max_new_tokens > limit:
        raise ValueError(f"a prompt is empty, or longer than the context of {limit} tokens less max_new_tokens "
                         f"= {max_new_tokens}")
    was_training = model.training
    model.eval()
    B, S = len(prompts), max(map(len, prompts))
    ids = torch.tensor([[0] * (S - len(p)) + list(p) for p in prompts], device=device)
    starts = torch.tensor([S - len(p) for p in prompts], device=device)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)
    seen[torch.arange(B, device=device)[:, None], ids] = True
    setup_caches(model, B, S + max_new_tokens if compile == "none" else limit)  # compiled: one size, one graph
    step = decode_one_token if compile == "none" else compiled_step(compile)
    out, done = [[] for _ in prompts], [False] * B
    try:
        logits = prefill(model, ids, starts)
        for i in range(max_new_tokens):
            token = sample(penalize(logits, seen, repetition_penalty), temperature, top_k, top_p, generator)
            added = [(b, t) for b, t in enumerate(token.tolist()) if not done[b]]  # one host sync per step
            for b, t in added:
                out[b].append(t)
                done[b] = t in stop_ids or (decode is not None and any(s in decode(out[b]) for s in stop_strings))
            seen[torch.arange(B, device=device), token] = True
            yield added
            if all(done) or i == max_new_tokens - 1:
                break
            logits = step(model, token[:, None], torch.tensor([S + i], device=device), starts)
    finally:  # the model goes back as it came: a forward without a cache computes attention afresh
        clear_caches(model)
        model.train(was_training)


def generate(model, prompts, max_new_tokens, temperature=0.0, **kwargs):
    """Token-id lists of the continuations of prompts (token-id lists of any lengths); greedy
    at temperature 0. The keyword arguments are generate_stream's."""
    out = [[] for _ in prompts]
    for added in generate_stream(model, prompts, max_new_tokens, temperature, **kwargs):
        for b, t in added:
            out[b].append(t)
    return out


@torch.no_grad()
def speculative_decode(model, draft, prompt, max_new_tokens, k=4, temperature=0.0, top_k=0, top_p=1.0,
                       stop_ids=(), seed=None):
    """One prompt's continuation (token ids), and (draft tokens accepted, model forwards). The draft proposes k
    tokens one by one; the model scores them all in one forward; each is kept with probability min(1, p_model /
    p_draft), the first one refused is drawn again from max(0, p_model - p_draft) renormalised, and when all k
    are kept the model's next token comes free: the output follows the model's distribution exactly (Leviathan
    et al. 2023; Chen et al. 2023). At temperature 0 both are one-hot: the model's greedy tokens."""
    if any("M" in m.cfg.block_pattern for m in (model, draft)):
        raise ValueError("speculative decoding takes back refused tokens by position, which a KV cache allows "
                         "and a Mamba layer's running state does not: use models without Mamba layers")
    if draft.cfg.vocab_size != model.cfg.vocab_size:
        raise ValueError(f"the draft's vocabulary ({draft.cfg.vocab_size} tokens) is not the model's "
                         f"({model.cfg.vocab_size}): a draft needs the same tokenizer")
    device, n = next(model.parameters()).device, len(prompt)
    if not prompt or n + max_new_tokens + k > min(model.cfg.max_seq_len, draft.cfg.max_seq_len):
        raise ValueError(f"a prompt of {n} tokens and {max_new_tokens} new ones (+ k = {k}) do not fit the context")
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None

    def dist(logits):  # what sample() draws from, as (rows, V) probabilities
        if temperature == 0:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return probabilities(logits, temperature, top_k, top_p)

    def forward(m, tokens, at):  # tokens written at cache positions at.. -> the next-token logits at each
        return m(torch.tensor([tokens], device=device), pos=torch.arange(at, at + len(tokens), device=device),
                 doc_starts=torch.zeros(1, len(tokens), dtype=torch.long, device=device))[0].float()

    for m in (model, draft):
        m.eval()
        setup_caches(m, 1, n + max_new_tokens + k)
        if n > 1:
            forward(m, prompt[:-1], 0)
    # The caches hold every token but the last one emitted, `pending`, at position n - 1 + len(out).
    out, pending, accepted, calls = [], prompt[-1], 0, 0
    try:
        while len(out) < max_new_tokens and not (out and out[-1] in stop_ids):
            pos = n - 1 + len(out)
            guesses, q = [], []
            for j in range(k):  # the draft writes pending and its guesses, proposing one after each
                q.append(dist(forward(draft, [guesses[-1] if guesses else pending], pos + j))[0])
                guesses.append(int(torch.multinomial(q[-1], 1, generator=generator)))
            p = dist(forward(model, [pending] + guesses, pos))  # (k + 1, V): the model after each
            calls += 1
            for j, g in enumerate(guesses):
                if torch.rand(1, generator=generator, device=device).item() >= (p[j, g] / q[j][g]).item():
                    residual = (p[j] - q[j]).clamp(min=0)
                    out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
                    break
                out.append(g)
                accepted += 1
            else:  # all k kept: the draft has not written its last guess yet; the bonus token
                forward(draft, guesses[-1:], pos + k)
                out.append(int(torch.multinomial(p[k], 1, generator=generator)))
            pending = out[-1]
    finally:
        clear_caches(model)
        clear_caches(draft)
    stops = [i for i, t in enumerate(out) if t in stop_ids]
    return out[:stops[0] + 1 if stops else max_new_tokens], (accepted, calls)


# ----------------------------------------------------------------------------------------
# Weight-only quantization: decoding one token reads every weight once, so its speed is the
# weights' bytes over memory bandwidth; 8 or 4 bits instead of 16 read 2x or ~3.5x fewer.

QUANTIZED = "quantized.safetensors"


class QuantizedLinear(nn.Module):
    """A bias-free linear layer whose weight is kept as
    int8: per output channel, symmetric, W = q * s with s = absmax / 127 (gpt-fast; the
        vector-wise scale of LLM.int8, Dettmers et al. 2022);
    int4: per group of group_size inputs, asymmetric, W = (q - z) * s with q in 0..15 spanning
        the group's min..max, two per byte (the storage of GPTQ/AWQ, without their calibration).
    Scales (and zeros) keep the float weight's dtype. fused.int8_linear / int4_linear compute
    x @ W.T from them (a Triton kernel on CUDA that dequantizes in registers)."""

    def __init__(self, weight, how, group_size=128):
        super().__init__()
        (n_out, n_in), dt = weight.shape, weight.dtype
        self.how, self.group_size = how, group_size
        w = weight.detach().float()
        if how == "int8":
            scales = (w.abs().amax(1) / 127).clamp(min=1e-12).to(dt)
            q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
            zeros = None
        else:
            if n_in % group_size:
                raise ValueError(f"int4: {n_in} input features are not a multiple of group_size {group_size}")
            w = w.view(n_out, n_in // group_size, group_size)
            lo, hi = w.amin(-1), w.amax(-1)
            scales = ((hi - lo) / 15).clamp(min=1e-12).to(dt)
            zeros = (-lo / scales.float()).to(dt)                          # q = z is W = 0; q = 0 is lo
            q = (w / scales.float()[..., None] + zeros.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
            q = q.view(n_out, n_in)
            q = q[:, 0::2] | (q[:, 1::2] << 4)                             # fused.unpack_int4's layout
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    def forward(self, x):
        if self.how == "int8":
            return fused.int8_linear(x, self.qweight, self.scales)
        return fused.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size)


def quantize(model, how, group_size=128):
    """Swap every block's linear layers for QuantizedLinear, in place. The embedding, norms and head stay in
    floating point (a tied head is the embedding, looked up, not multiplied; llama.cpp keeps the output layer at
    higher precision too), and so do a MoE layer's router (a rounding could change which experts a token gets)
    and its stacked experts (not linear layers: unfinished). Works on the meta device."""
    if how not in ("int8", "int4"):
        raise ValueError(f"quantize: {how!r} is not int8 or int4")
    for block in model.layers:
        for part in (block.attn, block.mlp):
            for name, child in list(part.named_children()):
                if isinstance(child, nn.Linear) and name != "router":
                    setattr(part, name, QuantizedLinear(child.weight, how, group_size))
    model.quantized = {"quantize": how, "group_size": str(group_size)}
    return model


def save_quantized(model, out_dir, tokenizer_path):
    """A directory that load() reads without the float weights: quantized.safetensors (the
    scheme in its metadata), config.toml and tokenizer.json."""
    from safetensors.torch import save_model
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"{out_dir}: exists and is not empty; refusing to overwrite it, give a new directory")
    os.makedirs(out_dir, exist_ok=True)
    save_model(model, os.path.join(out_dir, QUANTIZED), metadata=model.quantized)  # a tied head stored once
    with open(os.path.join(out_dir, "config.toml"), "w") as f:
        f.write(to_toml(Config(model=model.cfg, data=DataConfig(seq_len=model.cfg.max_seq_len))))
    shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tokenizer.json"))


def load(path, device="cpu", dtype=torch.float32):
    """(model, tokenizer) from a training checkpoint, a Hugging Face directory or a quantized
    one (save_quantized), in eval mode: checkpoint.py's one loading path for the first two."""
    from safetensors import safe_open
    from safetensors.torch import load_model
    from tokenizers import Tokenizer
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such checkpoint directory")
    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise ValueError(f"{path}: no tokenizer.json")
    if os.path.exists(os.path.join(path, QUANTIZED)):
        with safe_open(os.path.join(path, QUANTIZED), "pt") as f:
            scheme = f.metadata()
        with torch.device("meta"):
            model = quantize(Transformer(load_config(os.path.join(path, "config.toml")).model),
                             scheme["quantize"], int(scheme["group_size"]))
        model.to_empty(device=device)
        load_model(model, os.path.join(path, QUANTIZED), device=str(device))
        model.quantized = scheme
        for t in [*model.parameters(), *(b for n, b in model.named_buffers() if n.endswith(("scales", "zeros")))]:
            t.data = t.data.to(dtype)
    elif os.path.exists(os.path.join(path, "config.toml")):
        model = checkpoint.load_model(path, device)[1].to(dtype)
    else:
        model = checkpoint.load_hf(path, dtype, device)
    return model.eval(), Tokenizer.from_file(tok_path)


# ----------------------------------------------------------------------------------------
# Text in and out

def encode(tok, text):
    """A prompt's ids: <|bos|> then the text; chat text (chat_text) brings its own <|bos|>."""
    ids = tok.encode(text, add_special_tokens=False).ids
    bos = tok.token_to_id(BOS)
    return ids if ids[:1] == [bos] else [bos] + ids


def stop_ids(tok):
    """A continuation ends at <|eos|> (or the next document's <|bos|>); a chat turn at <|end|>."""
    return {tok.token_to_id(t) for t in (EOS, BOS, "<|end|>")} - {None}


def text_deltas(tok, tokens):
    """The text of a stream of token ids, piece by piece: a piece is held back while it ends
    inside a UTF-8 character that the next byte-level token may complete (at the end, as is)."""
    ids, shown, text = [], "", ""
    for t in tokens:
        ids.append(t)
        text = tok.decode(ids, skip_special_tokens=True)
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            yield text[len(shown):]
            shown = text
    if len(text) > len(shown):
        yield text[len(shown):]


def cut_at_stop(text, stop_strings):
    """The text up to the first stop string (OpenAI's convention: the stop string is not returned)."""
    return text[:min((text.find(s) for s in stop_strings if s in text), default=len(text))]


def chat(model, tok, args, read=input, write=print):
    """A multi-turn conversation on the terminal in the tokenizer's chat format; /reset forgets it."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = read("you> ")
        except EOFError:
            return messages
        if line.strip() in ("/quit", "/exit"):
            return messages
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        req = {**vars(args), "prompt": encode(tok, chat_text(messages)), "max_tokens": args.max_new_tokens, "stop": []}
        reply = complete(model, tok, req, lambda piece: write(piece, end="", flush=True))[0]
        write()
        messages.append({"role": "assistant", "content": reply})


# ----------------------------------------------------------------------------------------
# The server: `python infer.py --serve`
# OpenAI's shapes, so its clients work unchanged. Requests generate one at a time under a lock:
# queued, not batched (joining a running decode needs a cache row per request at its own position).
# Any ValueError is bad input (the codebase's convention), answered in OpenAI's error shape.

FIELDS = {  # name: (types, what it must be, test); absent or null: the command line's setting
    "max_tokens": (int, "an integer >= 1", lambda v: v >= 1),
    "temperature": ((int, float), "a number in [0, 2]", lambda v: 0 <= v <= 2),
    "top_p": ((int, float), "a number in (0, 1]", lambda v: 0 < v <= 1),
    "top_k": (int, "an integer >= 0 (0: no cut)", lambda v: v >= 0),
    "repetition_penalty": ((int, float), "a number > 0", lambda v: 0 < v < float("inf")),
    "seed": (int, "an integer in [0, 2**63)", lambda v: 0 <= v < 2 ** 63),
    "stream": (bool, "true or false", lambda v: True),
    "stop": ((str, list), "a non-empty string or a list of them",
             lambda v: all(isinstance(s, str) and s for s in ([v] if isinstance(v, str) else v)))}


def parse_request(body, chat, tok, args, name, limit):
    """The checked settings of a /v1/chat/completions (chat) or /v1/completions body."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    if body.get("model") not in (None, name):
        raise ValueError(f"model: {json.dumps(body['model'])[:80]} is not served here, {name!r} is", "model",
                         "model_not_found", 404)
    key = "messages" if chat else "prompt"
    if not isinstance(body.get(key), list if chat else str):
        raise ValueError(f"{key}: missing, or not a {'list of messages' if chat else 'string'}", key, "invalid_value")
    try:
        req = {"prompt": encode(tok, chat_text(body[key]) if chat else body[key])}
    except ValueError as e:  # chat_text names the bad message
        raise ValueError(str(e), key) from None
    defaults = {**vars(args), "max_tokens": args.max_new_tokens, "seed": None, "stream": False, "stop": []}
    for field, (kinds, want, ok) in FIELDS.items():
        value = body.get(field)
        typed = isinstance(value, kinds) and (kinds is bool or not isinstance(value, bool))  # true is not 1
        if value is not None and not (typed and ok(value)):
            raise ValueError(f"{field}: want {want}, got {json.dumps(value)[:80]}", field, "invalid_value")
        req[field] = defaults[field] if value is None else [value] if isinstance(value, str) else value  # stop: a list
    if len(req["prompt"]) + req["max_tokens"] > limit:
        raise ValueError(f"{key}: {len(req['prompt'])} tokens + max_tokens {req['max_tokens']} exceed the context "
                         f"of {limit} tokens", key, "context_length_exceeded")
    return req


def complete(model, tok, req, on_text, compile="none"):
    """Generate one request, passing on_text each new piece of text but never a stop string (a tail
    that may begin one waits for the next token); -> (text, completion tokens, finish reason)."""
    ids, stops = [], req["stop"]
    stream = generate_stream(model, [req["prompt"]], req["max_tokens"], req["temperature"], req["top_k"], req["top_p"],
                             req["repetition_penalty"], stop_ids(tok), stops, tok.decode, req["seed"], compile)
    text, shown = "", 0
    for piece in text_deltas(tok, (ids.append(t) or t for added in stream for _, t in added)):  # ids: kept
        text += piece
        held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        safe = min(len(cut_at_stop(text, stops)), len(text) - held)
        if safe > shown:
            on_text(text[shown:safe])
            shown = safe
    full = tok.decode(ids)
    text = cut_at_stop(full, stops)  # with what text_deltas holds back at the end: a cut UTF-8 character
    if len(text) > shown:
        on_text(text[shown:])
    return text, len(ids), "stop" if (ids and ids[-1] in stop_ids(tok)) or text != full else "length"


def make_server(model, tok, args):
    """A ThreadingHTTPServer on (args.host, args.port), port 0 for any free one, serving chat.html at /."""
    import threading
    import traceback
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    name, lock = os.path.basename(os.path.normpath(args.checkpoint)), threading.Lock()
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html"), "rb") as f:
        page = f.read()

    class Handler(BaseHTTPRequestHandler):
        def send(self, status, body, kind="application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def event(self, data):  # one server-sent event
            self.wfile.write(f"data: {json.dumps(data) if isinstance(data, dict) else data}\n\n".encode())

        def route(self):
            self.streaming, path = False, self.command + " " + self.path.split("?")[0]
            try:
                if path == "GET /":
                    return self.send(200, page, "text/html; charset=utf-8")
                if path == "GET /v1/models":
                    return self.send(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": ""}]})
                if path not in ("POST /v1/chat/completions", "POST /v1/completions"):
                    raise ValueError(f"no route {path}: the routes are POST /v1/chat/completions, POST "
                                     "/v1/completions, GET /v1/models and GET /", None, "not_found", 404)
                self.answer(path == "POST /v1/chat/completions")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client left; generate_stream's finally has put the model back
            except Exception as e:
                bad = type(e) is ValueError  # bad input; anything else is the server's fault
                error = {"message": repr(e), "param": None, "code": None, "status": 400 if bad else 500,
                         "type": "invalid_request_error" if bad else "server_error"}
                if bad:
                    error.update(zip(error, e.args))  # ValueError(message, param, code, status): as many as given
                else:
                    traceback.print_exc()
                status, error = error.pop("status"), {"error": error}
                self.event(error) if self.streaming else self.send(status, error)  # mid-stream: headers are gone

        def answer(self, chat):
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            except ValueError as e:
                raise ValueError(f"the body is not JSON: {e}") from None
            req = parse_request(body, chat, tok, args, name, model.cfg.max_seq_len)
            kind = ("chat.completion" + ".chunk" * req["stream"]) if chat else "text_completion"
            head = {"id": ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex(), "object": kind,
                    "created": int(time.time()), "model": name}

            def choice(text, finish):  # a chat message (a delta when streamed), or a completion's text
                out = {"delta" if req["stream"] else "message": {"role": "assistant", "content": text}} if chat else \
                    {"text": text, "logprobs": None}
                return {"index": 0, **out, "finish_reason": finish}
            if not req["stream"]:
                with lock:
                    text, n, finish = complete(model, tok, req, lambda piece: None, args.compile)
                usage = {"prompt_tokens": len(req["prompt"]), "completion_tokens": n,
                         "total_tokens": len(req["prompt"]) + n}
                return self.send(200, {**head, "choices": [choice(text, finish)], "usage": usage})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.streaming = True
            with lock:  # a queued stream has its headers and waits here
                finish = complete(model, tok, req, lambda text: self.event({**head, "choices": [choice(text, None)]}),
                                  args.compile)[2]
            self.event({**head, "choices": [choice("", finish)]})
            self.event("[DONE]")

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = route  # any other route: a 404 in the JSON shape
    return ThreadingHTTPServer((args.host, args.port), Handler)


def serve(model, tok, args):
    torch.manual_seed(args.seed)  # requests without a seed draw from the global generator: a server run repeats
    with make_server(model, tok, args) as server:
        print(f"serving {args.checkpoint} at http://{args.host}:{server.server_port}/ (OpenAI API under /v1/)",
              flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


# ----------------------------------------------------------------------------------------
# The command line

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (step_NNNNNNN), a Hugging Face "
                   "directory or a quantized one (--save-quantized)")
    p.add_argument("--prompt", action="append", default=[], help="repeat for several prompts, generated as one batch")
    p.add_argument("--prompt-file", action="append", default=[], help="a UTF-8 file whose text is one prompt")
    p.add_argument("--chat", action="store_true", help="talk on the terminal; /reset forgets, /quit ends")
    p.add_argument("--system", default="", help="the chat's system message")
    p.add_argument("--max-new-tokens", type=number(int, 0), default=120)
    p.add_argument("--temperature", type=number(float, 0.0), default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=number(int, 0), default=50, help="0: no top-k cut")
    p.add_argument("--top-p", type=number(float, 0.0), default=1.0, help="1: no nucleus cut")
    p.add_argument("--repetition-penalty", type=number(float, 1.0), default=1.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantization of the blocks' linears")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=128, help="int4's group of inputs")
    p.add_argument("--save-quantized", metavar="DIR", help="write the quantized model there and stop")
    p.add_argument("--draft", metavar="DIR", help="a smaller model with the same tokenizer: speculative decoding")
    p.add_argument("--speculate", type=number(int, 1), default=4, help="tokens the draft proposes per round")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--compile", choices=("none", "compile", "graphs"), default="none",
                   help="torch.compile the decode step; graphs: also capture it as a CUDA graph (static cache)")
    p.add_argument("--serve", action="store_true", help="an OpenAI-compatible HTTP server, a chat page at /")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=number(int, 0), default=8000)
    p.add_argument("--report", help="append the samples and speeds to this report.md")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    try:
        prompts = args.prompt + [data.read_text(path) for path in args.prompt_file]
        model, tok = load(args.checkpoint, args.device, dtype)
        if args.quantize:
            quantize(model, args.quantize, args.group_size)
        if args.save_quantized:
            if not args.quantize:
                raise ValueError("--save-quantized needs --quantize int8 or int4")
            save_quantized(model, args.save_quantized, os.path.join(args.checkpoint, "tokenizer.json"))
            return print(f"{args.save_quantized}: {args.quantize} model written")
        if args.draft and (args.chat or args.serve or args.repetition_penalty != 1.0):
            raise ValueError("--draft decodes --prompt and --prompt-file one by one, without --repetition-penalty; "
                             "--chat and --serve do not use a draft")
        draft, draft_tok = load(args.draft, args.device, dtype) if args.draft else (None, tok)
        if draft_tok is not tok and tok.get_vocab() != draft_tok.get_vocab():
            raise ValueError(f"{args.draft}: the draft's tokenizer is not the model's; speculative decoding "
                             "compares their distributions token by token, so it needs the same vocabulary")
        if args.serve:
            return serve(model, tok, args)
        if args.chat:
            return chat(model, tok, args)
        samples = run_prompts(model, draft, tok, [encode(tok, p) for p in prompts or [""]], args)
    except (ValueError, OSError) as e:  # bad input: one line naming the file or argument and what is wrong
        raise SystemExit(f"error: {e}") from None
    if args.report:
        with open(args.report, "a") as f:
            f.write(f"\n## Samples\n\nFrom `{args.checkpoint}`" + (f", {args.quantize}" if args.quantize else "") +
                    (f", drafted by `{args.draft}`" if args.draft else "") +
                    f", temperature {args.temperature}, top-k {args.top_k}.\n\n")
            f.writelines("```\n" + text.replace("```", "'''") + "\n```\n" + speed + "\n\n" for text, speed in samples)


def run_prompts(model, draft, tok, prompts, args):
    """Generate for each prompt (one batch, or one by one with a draft); print and return (text, speed) pairs."""
    stops = stop_ids(tok)
    t0 = time.perf_counter()
    if draft is None:
        outs = generate(model, prompts, args.max_new_tokens, args.temperature, top_k=args.top_k, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, stop_ids=stops, stop_strings=args.stop,
                        decode=tok.decode, seed=args.seed, compile=args.compile)
        seconds = time.perf_counter() - t0
        speeds = [f"{sum(map(len, outs))} tokens in {seconds:.2f}s: {sum(map(len, outs)) / seconds:.1f} tokens/s "
                  f"(batch {len(prompts)})"] * len(prompts)
    else:
        outs, speeds = [], []
        for p in prompts:
            t0 = time.perf_counter()
            out, (accepted, calls) = speculative_decode(model, draft, p, args.max_new_tokens, args.speculate,
                                                        args.temperature, args.top_k, args.top_p, stops, args.seed)
            seconds = time.perf_counter() - t0
            outs.append(out)
            speeds.append(f"{len(out)} tokens in {seconds:.2f}s: {len(out) / seconds:.1f} tokens/s; "
                          f"{accepted / max(1, calls * args.speculate):.0%} of drafted tokens accepted, "
                          f"{len(out) / max(1, calls):.2f} tokens per model forward")
    samples = [(cut_at_stop(tok.decode(p + out, skip_special_tokens=True), args.stop), speed)
               for p, out, speed in zip(prompts, outs, speeds)]
    for text, speed in samples:
        print(f"--- {speed}\n{text}\n")
    return samples


if __name__ == "__main__":
    main()
