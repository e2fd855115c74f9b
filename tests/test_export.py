"""`python checkpoint.py export CKPT OUT`, checked against transformers as the reference:
its AutoModelForCausalLM, AutoTokenizer and GenerationConfig load the directory alone."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

import checkpoint
from prep.tokenizer import SPECIAL_TOKENS, chat_text

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def exported(tiny_config):
    """(checkpoint dir, export dir): a 2-step tiny run, exported through the command line."""
    import train
    cfg = tiny_config(optim=dict(steps=2))
    train.train(cfg)
    ckpt = checkpoint.step_dirs(os.path.join(cfg.log.dir, "checkpoints"))[-1]
    out = os.path.join(cfg.log.dir, "hf")
    checkpoint.main(["export", ckpt, out])
    return ckpt, out


def test_model_logits_equal_ours(exported):
    ckpt, out = exported
    _, ours = checkpoint.load_model(ckpt)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (theirs(x).logits - ours(x)).abs().max().item() < 1e-4


def test_a_padded_vocabulary_is_exported_without_its_padding(tiny_config):
    """vocab_multiple pads 512 rows to 640; the export holds the 512 the tokenizer has, and
    transformers' logits equal ours, which stop at 512 too. Imported back under the padding,
    the extra rows read as zeros."""
    import train
    cfg = tiny_config(optim=dict(steps=2), model=dict(vocab_multiple=640))
    train.train(cfg)
    ckpt = checkpoint.step_dirs(os.path.join(cfg.log.dir, "checkpoints"))[-1]
    out = os.path.join(cfg.log.dir, "hf")
    checkpoint.main(["export", ckpt, out])
    _, ours = checkpoint.load_model(ckpt)
    assert ours.embed.weight.shape[0] == 640
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert theirs.config.vocab_size == 512 and theirs.get_input_embeddings().weight.shape[0] == 512
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert ours(x).shape[-1] == 512 and (theirs(x).logits - ours(x)).abs().max().item() < 1e-4
    back = checkpoint.build_model(cfg, weights=out)
    assert torch.equal(back.embed.weight[:512], ours.embed.weight[:512]) and not back.embed.weight[512:].any()


def test_tokenizer_encodes_and_decodes_as_ours(exported):
    ckpt, out = exported
    ours = Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert theirs.model_max_length == 64
    for text in ["def load(s, *, cls=None):\n    return  s , 'x' .", "café ☕ 12345", "<|user|>hi<|end|>"]:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text).ids
        assert theirs.decode(ids) == text
    ids = theirs("<|user|>hi<|end|>")["input_ids"]
    assert ids[0] == SPECIAL_TOKENS.index("<|user|>") and ids[-1] == SPECIAL_TOKENS.index("<|end|>")
    assert theirs.decode(ids, skip_special_tokens=True) == "hi"


def test_chat_template_renders_the_role_tokens(exported):
    theirs = transformers.AutoTokenizer.from_pretrained(exported[1])
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>"
    assert theirs.apply_chat_template(chat, tokenize=False).endswith("hi<|end|>")
    # the Python rendering infer.py and align.py use is the same text, with and without the prompt
    assert chat_text(chat) == text
    reply = chat + [{"role": "assistant", "content": "Hello."}]
    assert chat_text(reply, add_generation_prompt=False) == theirs.apply_chat_template(reply, tokenize=False)


def test_generation_config_stops_at_end_and_eos(exported):
    g = transformers.GenerationConfig.from_pretrained(exported[1])
    ids = {t: SPECIAL_TOKENS.index(t) for t in SPECIAL_TOKENS}
    assert (g.bos_token_id, g.eos_token_id, g.pad_token_id) == (ids["<|bos|>"], [ids["<|end|>"], ids["<|eos|>"]],
                                                                ids["<|pad|>"])


def test_export_refuses_a_used_directory_and_a_missing_checkpoint(exported, tmp_path):
    ckpt, out = exported
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    with pytest.raises(SystemExit) as e:
        checkpoint.main(["export", ckpt, out])
    assert str(e.value) == f"error: {out}: exists and is not empty; refusing to overwrite it, give a new directory"
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before
    missing = str(tmp_path / "step_0000009")
    with pytest.raises(SystemExit) as e:
        checkpoint.main(["export", missing, str(tmp_path / "hf")])
    assert str(e.value) == f"error: {missing}: no such checkpoint directory"
    assert not (tmp_path / "hf").exists()


def test_command_line_prints_what_it_wrote_in_bfloat16(exported, tmp_path):
    """The script itself, as a user runs it."""
    r = subprocess.run([sys.executable, "checkpoint.py", "export", exported[0], str(tmp_path / "hf"), "--dtype",
                        "bfloat16"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"{tmp_path / 'hf'}: wrote config.json, generation_config.json, "
                                "model.safetensors, tokenizer.json, tokenizer_config.json")
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.vocab_size == 512
