"""muP's coordinate check (Yang et al. 2021, Tensor Programs V, section 4.1): train a few
steps at several widths, then measure the mean absolute value of each layer type's output.
Under muP the curves stay flat as the width grows; under the standard parametrisation they
grow, and with them the learning rate that works shrinks.

    python scripts/coord_check.py --config configs/tiny.toml [--widths 64,128,256,512] [--steps 4]
        [--out coord_check.png]

The widths change d_model with the head count fixed (so d_head grows too); muP's base width
is the first. A table per parametrisation is printed; --out draws it (matplotlib, optional).
"""
import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402
from config import load_config  # noqa: E402
from model import Transformer  # noqa: E402

LAYER_TYPES = ("embedding", "attention", "mlp", "logits")


def activation_scales(cfg, steps):
    """{layer type: mean |output|} on a fixed batch after `steps` optimizer steps from the
    seeded initialisation (averaged over the layers of a type)."""
    torch.manual_seed(cfg.data.seed)
    model = Transformer(cfg.model)
    optimizer = train.build_optimizer(list(model.named_parameters()), cfg.optim, torch.device("cpu"), cfg.model)
    loader = data.make_loader(cfg.data.train, cfg.data.seq_len, cfg.data.micro_batch, seed=cfg.data.seed)
    for step in range(steps):
        x, y = loader.next_batch()
        train.set_lr(optimizer, cfg.optim.lr)
        model(x, y).backward()
        optimizer.step()
        optimizer.zero_grad()
    sums = {t: [] for t in LAYER_TYPES}
    hooks = [model.embed.register_forward_hook(lambda m, i, o: sums["embedding"].append(o.abs().mean().item()))]
    for layer in model.layers:
        hooks.append(layer.attn.register_forward_hook(lambda m, i, o: sums["attention"].append(o.abs().mean().item())))
        hooks.append(layer.mlp.register_forward_hook(lambda m, i, o: sums["mlp"].append(o.abs().mean().item())))
    x, _ = loader.next_batch()
    with torch.no_grad():
        sums["logits"].append(model(x).abs().mean().item())
    for h in hooks:
        h.remove()
    return {t: sum(v) / len(v) for t, v in sums.items()}


def coord_check(cfg, widths, steps):
    """{"standard" | "mup": {width: activation_scales}}; muP's base width is widths[0]."""
    out = {}
    for mup in (False, True):
        out["mup" if mup else "standard"] = {
            w: activation_scales(dataclasses.replace(cfg, model=dataclasses.replace(
                cfg.model, d_model=w, head_dim=0, d_ff=0, moe_d_ff=0, ssm_dt_rank=0, mup=mup,
                mup_base_width=widths[0])), steps) for w in widths}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--widths", default="64,128,256,512")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", help="a PNG of the curves (needs matplotlib)")
    args = p.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    result = coord_check(load_config(args.config, args.set), widths, args.steps)
    for name, by_width in result.items():
        print(f"\n{name}: mean |output| after {args.steps} steps\n| width | " + " | ".join(LAYER_TYPES) + " |")
        print("|---" * (len(LAYER_TYPES) + 1) + "|")
        for w, scales in by_width.items():
            print(f"| {w} | " + " | ".join(f"{scales[t]:.4f}" for t in LAYER_TYPES) + " |")
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
        for ax, (name, by_width) in zip(axes, result.items()):
            for t in LAYER_TYPES:
                ax.plot(widths, [by_width[w][t] for w in widths], marker="o", label=t)
            ax.set(title=name, xlabel="width (d_model)", xscale="log", yscale="log")
        axes[0].set_ylabel(f"mean |output| after {args.steps} steps")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out, dpi=100)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
