"""infer.py — text generation from a checkpoint.

    python infer.py --checkpoint runs/demo/checkpoints/step_0000600 --prompt "def " [--report runs/demo/report.md]

Generation here recomputes the whole context for each new token (as nanoGPT's sample.py
does): simple and exact, and fast enough for the demo's tiny model.
"""
import argparse
import os

import torch

import checkpoint
import data
from config import number
from prep.tokenizer import BOS


@torch.no_grad()
def generate(model, ids, max_new_tokens, temperature=1.0, top_k=None, eos_id=None):
    """ids (B, S) -> (B, S + up to max_new_tokens). temperature 0 is greedy; top_k keeps
    the k most likely tokens before sampling; stops early once every row emitted eos_id."""
    model.eval()
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = model(ids[:, -model.cfg.max_seq_len:])[:, -1, :].float()  # (B, vocab)
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if eos_id is not None:
            done |= nxt == eos_id
            if done.all():
                break
    return ids


def main(argv=None):
    from tokenizers import Tokenizer
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (step_NNNNNNN)")
    p.add_argument("--prompt", action="append", default=[], help="repeat for several prompts")
    p.add_argument("--prompt-file", action="append", default=[], help="a UTF-8 file whose text is one prompt")
    p.add_argument("--max-new-tokens", type=number(int, 0), default=120)
    p.add_argument("--temperature", type=number(float, 0.0), default=0.8)
    p.add_argument("--top-k", type=number(int, 0), default=50, help="0: no top-k cut")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", help="append the samples to this report.md")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        prompts = args.prompt + [data.read_text(path) for path in args.prompt_file]
        _, model = checkpoint.load_model(args.checkpoint)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    tok = Tokenizer.from_file(os.path.join(args.checkpoint, "tokenizer.json"))
    bos = tok.token_to_id(BOS)
    samples = []
    for prompt in prompts or [""]:
        ids = torch.tensor([[bos] + tok.encode(prompt, add_special_tokens=False).ids])
        out = generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, eos_id=bos)
        text = tok.decode(out[0, 1:].tolist(), skip_special_tokens=True)
        samples.append(text)
        print(f"--- prompt {prompt!r}\n{text}\n")
    if args.report:
        with open(args.report, "a") as f:
            f.write(f"\n## Samples\n\nFrom `{args.checkpoint}`, temperature {args.temperature}, "
                    f"top-k {args.top_k}.\n\n")
            for text in samples:
                f.write("```\n" + text.replace("```", "'''") + "\n```\n\n")


if __name__ == "__main__":
    main()
