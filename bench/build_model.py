"""Host memory and time to build one rank's part of a model: checkpoint.build_model (meta device,
then one whole tensor at a time) against building the whole model and cutting it.

    python bench/build_model.py [--config configs/llama-1b.toml] [--tp 1] [--pp 4] [--rank 0]

Each way runs in a fresh process, so its peak resident memory (ru_maxrss) is its own. Both
build on the CPU (on a GPU, train.py draws the weights there instead). No process group is
needed: the grid position is given on the command line.
"""
import argparse
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build(args):
    import torch

    import checkpoint
    import parallel
    from config import load_config
    from model import Transformer
    cfg = load_config(args.config, [f"parallel.tp={args.tp}", f"parallel.pp={args.pp}", "parallel.dp=1",
                                    "parallel.cp=1"])
    grid = parallel.Grid(tp=args.tp, pp=args.pp, tp_rank=args.rank % args.tp, pp_rank=args.rank // args.tp)
    start = time.perf_counter()
    if args.way == "build_model":
        model = checkpoint.build_model(cfg, torch.device("cpu"), grid=grid)
    else:
        torch.manual_seed(cfg.data.seed)
        model = Transformer(cfg.model)
        parallel.parallelize(model, grid, cfg.parallel)
    seconds = time.perf_counter() - start
    held = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"| {args.way} | {held:.2f} | {peak:.2f} | {seconds:.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "llama-1b.toml"))
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--rank", type=int, default=0, help="tp-major rank within the tp x pp grid")
    p.add_argument("--way", choices=("build_model", "whole_then_cut"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.way:
        return build(args)
    print(f"{os.path.basename(args.config)}, tp{args.tp} x pp{args.pp}, rank {args.rank}\n")
    print("| way | parameters held (GiB) | peak host memory (GiB) | seconds |\n|---|---|---|---|")
    for way in ("build_model", "whole_then_cut"):
        subprocess.run([sys.executable, __file__, "--config", args.config, "--tp", str(args.tp), "--pp", str(args.pp),
                        "--rank", str(args.rank), "--way", way], check=True)


if __name__ == "__main__":
    main()
