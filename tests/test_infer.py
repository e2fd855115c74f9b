"""infer.py: the KV cache against full recomputation, batches against single prompts, greedy
decoding and the sampling filters against transformers, speculative decoding against the
target's own distribution, quantized weights against float ones, and the command line."""
import copy
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

import checkpoint
import infer
from conftest import check_cached_decoding, rows_alone
from model import ModelConfig, Transformer
from prep.tokenizer import chat_text

transformers = pytest.importorskip("transformers")

# init_std 0.1 gives peaked next-token distributions: greedy choices far from ties.
TINY = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, init_std=0.1)


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def hf_dir(tokens_dir, tmp_path_factory):
    """A Hugging Face directory of a tiny random model with the session's tokenizer."""
    d = tmp_path_factory.mktemp("hf")
    checkpoint.save_hf(tiny(), str(d))
    shutil.copyfile(tokens_dir / "tokenizer.json", d / "tokenizer.json")
    return str(d)


PROMPTS = [[1, 5, 7, 9, 11], [1, 3], [2, 4, 6, 8, 10, 12, 14, 16, 18]]


def softmax_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """Attention as a plain softmax: a query that sees no key gets NaN, as it does in attention
    kernels without torch's fully-masked-row rule (its math backend returns zeros there)."""
    if enable_gqa:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    if is_causal:
        attn_mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    return scores.masked_fill(~attn_mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("attention", ["sdpa", "softmax"])
def test_cached_decoding_gives_the_logits_of_a_full_recomputation(monkeypatch, attention):
    """Left-padded prompts of three lengths in one batch: prefill, then one cached step at a
    time; every row's logits at every step equal recomputing its sequence alone. Under a plain
    softmax a padding position that saw nothing would write NaN into the cache."""
    model, ref = tiny(), tiny()
    if attention == "softmax":
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", softmax_attention)
    check_cached_decoding(model, ref, PROMPTS, 6)


def test_batched_generation_equals_one_by_one_and_finished_rows_stop_growing():
    model = tiny()
    alone = [infer.generate(model, [p], 12)[0] for p in PROMPTS]
    assert infer.generate(model, PROMPTS, 12) == alone == [t for t, _ in rows_alone(model, PROMPTS, 12)]
    stop = alone[0][3]  # row 0 ends on its 4th token; a row that meets it later ends there too
    ends = [row.index(stop) + 1 if stop in row else 12 for row in alone]
    assert infer.generate(model, PROMPTS, 12, stop_ids={stop}) == [row[:n] for row, n in zip(alone, ends)]


def test_greedy_decoding_and_repetition_penalty_equal_transformers_generate(hf_dir):
    ours, _ = infer.load(hf_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    for penalty in (1.0, 1.3):
        got = infer.generate(ours, PROMPTS, 15, repetition_penalty=penalty)
        for p, row in zip(PROMPTS, got):
            want = theirs.generate(torch.tensor([p]), max_new_tokens=15, do_sample=False, repetition_penalty=penalty,
                                   eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            assert row == want


def test_sampling_filters_equal_transformers_warpers():
    from transformers.generation import logits_process as lp
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for t, k, p in [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.9, 10, 0.5)]:
        x = lp.TemperatureLogitsWarper(t)(None, logits)
        x = lp.TopKLogitsWarper(k)(None, x) if k else x
        x = lp.TopPLogitsWarper(p)(None, x) if p < 1 else x
        torch.testing.assert_close(infer.probabilities(logits, t, k, p), torch.softmax(x, -1))


def test_sampling_is_seeded_and_stop_strings_end_a_row(hf_dir):
    model, tok = infer.load(hf_dir)
    prompts = [infer.encode(tok, "def f(x):"), infer.encode(tok, "import")]
    a = infer.generate(model, prompts, 20, temperature=1.0, top_k=40, seed=3)
    assert a == infer.generate(model, prompts, 20, temperature=1.0, top_k=40, seed=3)
    assert a != infer.generate(model, prompts, 20, temperature=1.0, top_k=40, seed=4)
    alone = infer.generate(model, prompts[:1], 20, temperature=1.0, top_k=40, seed=3)[0]  # other draws than a[0]
    text = tok.decode(alone)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    got = infer.generate(model, prompts[:1], 20, temperature=1.0, top_k=40, seed=3, stop_strings=[stop],
                         decode=tok.decode)[0]
    assert stop in tok.decode(got) and stop not in tok.decode(got[:-1]) and got == alone[:len(got)]
    assert infer.cut_at_stop(tok.decode(got), [stop]) == text[:text.index(stop)]


def test_text_deltas_hold_back_a_split_character(hf_dir):
    _, tok = infer.load(hf_dir)
    ids = tok.encode("café ☕ x", add_special_tokens=False).ids
    pieces = list(infer.text_deltas(tok, ids))
    assert "".join(pieces) == "café ☕ x" and not any("\ufffd" in p for p in pieces)
    cut = tok.encode("☕", add_special_tokens=False).ids[:-1]  # a stream that ends inside the character
    assert tok.decode(cut).endswith("\ufffd") and "".join(infer.text_deltas(tok, cut)) == tok.decode(cut)


def test_greedy_speculative_decoding_emits_the_targets_greedy_tokens():
    model, draft = tiny(0), tiny(1, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1)
    for k in (1, 3, 5):
        for p in PROMPTS:
            out, (accepted, calls) = infer.speculative_decode(model, draft, p, 15, k=k)
            assert out == infer.generate(model, [p], 15)[0]
            assert accepted <= calls * k and calls <= 15
    out, (accepted, calls) = infer.speculative_decode(model, model, PROMPTS[0], 15, k=4)
    assert accepted == 12 and calls == 3  # a draft that is the model: every guess kept, one bonus per round


def test_the_draft_proposes_from_the_whole_text_in_every_round():
    """A copy of the model as draft keeps every guess, so each round ends on the bonus token,
    after which the draft must still write its own last guess: every logit the draft computes
    equals recomputing the text up to that position (no hole left in its cache)."""
    model, draft, ref = tiny(), tiny(), tiny()
    seen = []  # (first position, logits) of every draft forward
    draft.register_forward_hook(lambda m, args, kwargs, out: seen.append((int(kwargs["pos"][0]), out[0])),
                                with_kwargs=True)
    out, (accepted, calls) = infer.speculative_decode(model, draft, PROMPTS[0], 15, k=4)
    text = PROMPTS[0] + out
    assert accepted == 12 and len(seen) > 12
    with torch.no_grad():
        for start, logits in seen:
            for i, row in enumerate(logits):
                if start + i < len(text):
                    torch.testing.assert_close(row, ref(torch.tensor([text[:start + i + 1]]))[0, -1],
                                               atol=1e-4, rtol=1e-4)


def test_sampled_speculative_decoding_follows_the_target_distribution():
    """Pearson's chi-square of 2000 two-token continuations (64 cells on an 8-token vocabulary)
    against the target's exact joint distribution. The draft is far from the target (distinct
    random weights, peaked), so many guesses are refused and the residual draws matter."""
    vocab = dict(vocab_size=8, init_std=0.3)
    model, draft = tiny(0, **vocab), tiny(1, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, **vocab)
    prompt, n = [1, 2, 3], 2000
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt]))[0, -1].double(), -1)
        p2 = torch.stack([torch.softmax(model(torch.tensor([prompt + [t]]))[0, -1].double(), -1) for t in range(8)])
    expected = (p1[:, None] * p2).flatten() * n
    counts, accepted, drafted = torch.zeros(64, dtype=torch.float64), 0, 0
    for seed in range(n):
        out, (a, calls) = infer.speculative_decode(model, draft, prompt, 2, k=2, temperature=1.0, seed=seed)
        counts[out[0] * 8 + out[1]] += 1
        accepted, drafted = accepted + a, drafted + 2 * calls
    assert 0.1 < accepted / drafted < 0.9  # the test exercises both the accept and the residual paths
    big = expected >= 5  # cells expected under 5 are pooled into one
    chi2 = (((counts[big] - expected[big]) ** 2 / expected[big]).sum() +
            (counts[~big].sum() - expected[~big].sum()) ** 2 / expected[~big].sum()).item()
    df = int(big.sum())  # cells - 1, counting the pooled one
    assert chi2 < df + 4 * (2 * df) ** 0.5, (chi2, df)  # ~ the 0.999 quantile for these df


def test_int8_logits_within_one_percent_and_int4_within_ten():
    """Relative error ||logits_q - logits|| / ||logits|| on a tiny model with weights of a
    trained model's scale (std 0.02). Measured: int8 0.5%, int4 6% at group 32 and 7% at 64
    (its 16 levels span each group's min..max)."""
    ref = tiny(init_std=0.02)
    x = torch.tensor(PROMPTS[2:])
    with torch.no_grad():
        want = ref(x)
        for how, group, bound in [("int8", 128, 0.01), ("int4", 32, 0.10), ("int4", 64, 0.10)]:
            got = infer.quantize(copy.deepcopy(ref), how, group)(x)
            assert ((got - want).norm() / want.norm()).item() < bound, (how, group)


def test_quantization_formats_decode_to_the_weights_they_stand_for():
    """Closed forms: int8 q = round(W / s), s = absmax / 127 per row; int4 each group's min and
    max are levels 0 and 15, and every weight is within half a step of its level."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    q8 = infer.QuantizedLinear(w, "int8")
    torch.testing.assert_close(q8.scales, w.abs().amax(1) / 127)
    assert q8.qweight.dtype == torch.int8 and q8.qweight.abs().amax(1).eq(127).all()
    q4 = infer.QuantizedLinear(w, "int4", 16)
    import fused
    levels = fused.unpack_int4(q4.qweight).float().view(8, 4, 16)
    back = (levels - q4.zeros[..., None]) * q4.scales[..., None]
    g = w.view(8, 4, 16)
    assert (levels.amin(-1) == 0).all() and (levels.amax(-1) == 15).all() and q4.qweight.shape == (8, 32)
    assert ((back - g).abs() <= q4.scales[..., None] / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="not a multiple of group_size 128"):
        infer.QuantizedLinear(w, "int4", 128)


@pytest.mark.parametrize("how", ["int8", "int4"])
def test_a_quantized_model_round_trips_through_safetensors(hf_dir, tmp_path, how):
    from safetensors import safe_open
    model, _ = infer.load(hf_dir)
    infer.quantize(model, how, 32)
    out = str(tmp_path / how)
    infer.save_quantized(model, out, os.path.join(hf_dir, "tokenizer.json"))
    with safe_open(os.path.join(out, infer.QUANTIZED), "pt") as f:
        assert "layers.0.attn.q_proj.weight" not in f.keys()  # no float weight of a quantized layer
        assert f.get_tensor("layers.0.mlp.up_proj.qweight").dtype == (torch.int8 if how == "int8" else torch.uint8)
    assert os.path.getsize(os.path.join(out, infer.QUANTIZED)) < os.path.getsize(os.path.join(hf_dir,
                                                                                               "model.safetensors"))
    back, _ = infer.load(out)
    x = torch.tensor(PROMPTS[2:])
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    with pytest.raises(ValueError, match="exists and is not empty"):
        infer.save_quantized(model, out, os.path.join(hf_dir, "tokenizer.json"))


def test_chat_keeps_the_conversation_and_matches_generate(hf_dir):
    model, tok = infer.load(hf_dir)
    args = SimpleNamespace(system="Be brief.", max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0,
                           repetition_penalty=1.0, seed=0)
    lines, shown = ["hi", "/reset", "hello", "again"], []

    def read(_):
        if not lines:
            raise EOFError  # Ctrl-D ends the conversation
        return lines.pop(0)
    messages = infer.chat(model, tok, args, read=read, write=lambda s="", **kw: shown.append(s))
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]

    def reply(ms):
        ids = infer.generate(model, [infer.encode(tok, chat_text(ms))], 8, stop_ids=infer.stop_ids(tok))[0]
        return tok.decode(ids, skip_special_tokens=True)
    assert messages[2]["content"] == reply(messages[:2])
    assert messages[4]["content"] == reply(messages[:4])  # the second turn sees the first
    assert "".join(shown).replace("\n", "") == reply(messages[:1] + [{"role": "user", "content": "hi"}]) + \
        messages[2]["content"] + messages[4]["content"]


def test_compiled_decoding_equals_eager():
    model = tiny()
    assert infer.generate(model, PROMPTS, 6, compile="compile") == infer.generate(model, PROMPTS, 6)


# ----------------------------------------------------------------------------------------
# The command line

def run_cli(capsys, *argv):
    infer.main(list(argv))
    return capsys.readouterr().out


def test_command_line_from_a_training_checkpoint_writes_the_report(tiny_config, capsys):
    import train
    cfg = tiny_config(optim=dict(steps=2), checkpoint=dict(every=2))
    train.train(cfg)
    ckpt = checkpoint.step_dirs(os.path.join(cfg.log.dir, "checkpoints"))[-1]
    report = os.path.join(cfg.log.dir, "report.md")
    out = run_cli(capsys, "--checkpoint", ckpt, "--prompt", "def ", "--prompt", "import json",
                  "--max-new-tokens", "5", "--temperature", "0", "--report", report)
    model, tok = infer.load(ckpt)
    for p in ("def ", "import json"):
        ids = infer.encode(tok, p)
        text = tok.decode(ids + infer.generate(model, [ids], 5, stop_ids=infer.stop_ids(tok))[0],
                          skip_special_tokens=True)
        assert text in out
        assert text in open(report).read()
    assert "tokens/s (batch 2)" in out


def test_command_line_quantizes_saves_and_drafts(hf_dir, tmp_path, capsys):
    q = str(tmp_path / "q")
    assert "int8 model written" in run_cli(capsys, "--checkpoint", hf_dir, "--quantize", "int8",
                                           "--save-quantized", q)
    out = run_cli(capsys, "--checkpoint", q, "--prompt", "def", "--temperature", "0", "--max-new-tokens", "6",
                  "--draft", hf_dir, "--speculate", "3")
    assert "of drafted tokens accepted" in out and "tokens per model forward" in out


def infer_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        infer.main(list(argv))
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--top-k", "-1"], "argument --top-k: -1: must be at least 0"),
    (["--temperature", "-1"], "argument --temperature: -1: must be at least 0.0"),
    (["--temperature", "nan"], "argument --temperature: nan: must be at least 0.0"),
    (["--max-new-tokens", "-3"], "argument --max-new-tokens: -3: must be at least 0"),
    (["--quantize", "int3"], "argument --quantize: invalid choice: 'int3'"),
    (["--group-size", "100"], "argument --group-size: invalid choice: 100"),
])
def test_bad_arguments_are_refused(capsys, tmp_path, argv, message):
    code, err = infer_error(capsys, "--checkpoint", str(tmp_path), *argv)
    assert code == 2 and message in err


def test_bad_input_is_named_in_one_line(capsys, tmp_path, hf_dir, tokens_dir):
    code, _ = infer_error(capsys, "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi")
    assert code == f"error: {tmp_path / 'nope'}: no such checkpoint directory"
    (tmp_path / "p.txt").write_bytes("café".encode("latin-1"))
    code, _ = infer_error(capsys, "--checkpoint", hf_dir, "--prompt-file", str(tmp_path / "p.txt"))
    assert code.startswith(f"error: {tmp_path / 'p.txt'}: not UTF-8 text")
    code, _ = infer_error(capsys, "--checkpoint", hf_dir, "--prompt", "x " * 80)
    assert code.startswith("error: a prompt is empty, or longer than the context of 64 tokens")
    code, _ = infer_error(capsys, "--checkpoint", hf_dir, "--save-quantized", str(tmp_path / "q"))
    assert code == "error: --save-quantized needs --quantize int8 or int4"
    # A draft whose tokenizer has another vocabulary is refused before any generation.
    from prep.tokenizer import train_tokenizer
    other = tmp_path / "other"
    checkpoint.save_hf(tiny(vocab_size=300), str(other))
    train_tokenizer(["some other text " * 50], 300).save(str(other / "tokenizer.json"))
    code, _ = infer_error(capsys, "--checkpoint", hf_dir, "--draft", str(other), "--prompt", "hi")
    assert code.startswith(f"error: {other}: the draft's tokenizer is not the model's")
    with pytest.raises(ValueError, match="a draft needs the same tokenizer"):
        infer.speculative_decode(tiny(), tiny(vocab_size=300), [1, 2], 4)
    for flag in (["--chat"], ["--serve"], ["--repetition-penalty", "1.2"]):
        code, _ = infer_error(capsys, "--checkpoint", hf_dir, "--draft", hf_dir, *flag)
        assert code.startswith("error: --draft decodes --prompt and --prompt-file one by one")
