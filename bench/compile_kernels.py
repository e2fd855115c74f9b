"""Compile every Triton kernel of fused.py for a GPU, on a machine that has none, and print
for each autotune config what the compiled code holds: registers per thread, the stack frame
(register spills live there), shared memory, and which matrix instructions the dots became.

    python bench/compile_kernels.py                        # sm_90 (H100/H200) and sm_80 (A100)
    python bench/compile_kernels.py --arch 90 --dtype bf16 --first-config

The interpreter runs a kernel's Python, not its GPU code, so a kernel that passes every test
under TRITON_INTERPRET=1 can still fail to compile (an operation with no instruction for that
dtype, a tile tl.dot cannot take) or fail to launch (more shared memory than the SM has). This
script finds out on a CPU: it runs fused.py's public ops on small CPU tensors with every
kernel replaced by a recorder of its launches, then compiles each recorded launch for the
target with each of the kernel's autotune configs, as the autotuner would on that GPU.
Registers and spills decide occupancy and speed there, so they are what to read before tuning.
The last two columns read the machine code. "access": the widest global load in bytes per
thread (16 is the full vector width that memory-bound kernels want). "mma": on sm_90, HGMMA
is Hopper's warpgroup matrix instruction (wgmma); HMMA there is the older per-warp one, a
slower path for the same dot (Triton falls back to it when a dot's M is under 64 rows per
warpgroup, for one).
Exit status 1 when a compile fails.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # the GPU configs and code paths, not the interpreter's
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import fused  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Shared memory one block may use, bytes (CUDA programming guide, compute capabilities table).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch, runs nothing."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def record_launches(dtype, head_dims):
    """{kernel name: (kernel, [(args, kwargs), ...])} from one forward and backward of each op."""
    recorders = {name: Recorder(obj) for name, obj in vars(fused).items()
                 if isinstance(obj, (JITFunction, Autotuner))}
    saved_use_triton = fused.use_triton
    for name, rec in recorders.items():
        setattr(fused, name, rec)
    fused.use_triton = lambda x: True   # CPU tensors down the Triton path; nothing is launched
    try:
        def backward(out, *inputs):
            torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)

        for D in head_dims:
            q, k, v = (torch.randn(1, h, 256, D, dtype=dtype, requires_grad=True) for h in (4, 2, 2))
            backward(fused.attention(q, k, v, causal=True), q, k, v)
            lse, delta = torch.zeros(1, 4, 256), torch.zeros(1, 4, 256)
            fused.attention_block_backward(q, k, v, q, lse, delta, causal=False)   # ring attention's block
        x, w = torch.randn(64, 4096, dtype=dtype, requires_grad=True), torch.ones(4096, dtype=dtype, requires_grad=True)
        backward(fused.rms_norm(x, w, 1e-5), x, w)
        gate, up = (torch.randn(64, 14336, dtype=dtype, requires_grad=True) for _ in range(2))
        backward(fused.swiglu(gate, up), gate, up)
        logits, targets = torch.randn(64, 128256, dtype=dtype, requires_grad=True), torch.zeros(64, dtype=torch.long)
        backward(fused.cross_entropy(logits, targets), logits)
        x = torch.randn(1, 4096, dtype=dtype)   # one decode token through weight-only quantized linears
        fused.int8_linear(x, torch.zeros(4096, 4096, dtype=torch.int8), torch.ones(4096))
        scales, zeros = torch.ones(4096, 32), torch.zeros(4096, 32)   # group size 128, the default
        fused.int4_linear(x, torch.zeros(4096, 2048, dtype=torch.uint8), scales, zeros, 128)
        # 8 experts' up-projections (d 1024 -> 2048), 64 tokens each: forward, dx (the forward
        # kernel reading w in the other order) and dW.
        x, w = torch.randn(512, 1024, dtype=dtype, requires_grad=True), torch.randn(8, 2048, 1024, dtype=dtype,
                                                                                     requires_grad=True)
        backward(fused.grouped_matmul(x, w, torch.full((8,), 64)), x, w)
        # A Mamba block's selective scan (d_inner 2048, 16 states, 512 steps): the forward, the
        # backward's replay of it for the chunk states (ALL_STATES), and the backward.
        x, dt = (torch.randn(2, 512, 2048, dtype=dtype, requires_grad=True) for _ in range(2))
        B, C = (torch.randn(2, 512, 16, dtype=dtype, requires_grad=True) for _ in range(2))
        A, D = -torch.rand(2048, 16, requires_grad=True), torch.randn(2048, requires_grad=True)
        backward(fused.selective_scan(x, dt, A, B, C, D), x, dt, A, B, C, D)
    finally:
        for name, rec in recorders.items():
            setattr(fused, name, rec.kernel)
        fused.use_triton = saved_use_triton
    return {name: (rec.kernel, rec.launches) for name, rec in recorders.items() if rec.launches}


def compile_launch(kernel, args, kwargs, arch):
    """triton.compile of one launch for sm_<arch>, specialised as a launch on that GPU would be."""
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def cuobjdump(compiled, flag):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(compiled):
    """(registers per thread, stack frame bytes per thread, static shared bytes, widest global
    load in bytes, matrix instructions) of the compiled kernel. Spilled registers go to the
    stack frame (LDL/STL); LDG.E.128 is a 16-byte load, LDGSTS one straight into shared memory."""
    out = cuobjdump(compiled, "--dump-resource-usage")
    fields = dict(item.split(":") for item in out.split("Function", 1)[1].split()[1:] if ":" in item)
    sass = cuobjdump(compiled, "--dump-sass")
    # The width is the modifier that is a number of bits (".128", ".U16"), wherever it stands:
    # sm_80's cp.async reads "LDGSTS.E.BYPASS.LTC128B.128"; none means 32 bits.
    sizes = [[int(m[1]) for m in map(re.compile(r"[US]?(\d+)").fullmatch, mods.split(".")) if m]
             for mods in re.findall(r"\bLDG(?:STS)?((?:\.\w+)+)", sass)]
    widths = [(bits or [32])[0] // 8 for bits in sizes]
    mma = collections.Counter(re.findall(r"\b(HGMMA|HMMA)\.", sass))
    return (int(fields["REG"]), int(fields["STACK"]), int(fields["SHARED"]), max(widths, default=0),
            "+".join(sorted(mma)) or "-")


def configs_of(kernel, first_only):
    """The autotune configs the autotuner would try (first only: one), or the launch's own."""
    if not isinstance(kernel, Autotuner):
        return [None]
    return kernel.configs[:1] if first_only else kernel.configs


def describe(meta):
    """(blocks, warps, stages, the other constexprs) of one launch's keyword arguments."""
    blocks = "x".join(str(meta[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK", "BLOCK_L", "BLOCK_D")
                      if k in meta)
    fixed = ",".join(f"{k}={meta[k]}" for k in ("HEAD_DIM", "CAUSAL", "BLOCK_V", "INT4", "N_POW2", "ALL_STATES")
                     if k in meta)
    return blocks, meta.get("num_warps", 4), meta.get("num_stages", 3), fixed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="90,80", help="compute capabilities, e.g. 90 (H100/H200), 80 (A100)")
    p.add_argument("--dtype", default="bf16,fp16,fp32")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--first-config", action="store_true", help="only each kernel's first autotune config")
    args = p.parse_args()
    head_dims = [int(d) for d in args.head_dims.split(",")]
    print(f"triton {triton.__version__}; compiled offline, no GPU needed; shared = dynamic + static bytes\n")
    print("| arch | dtype | kernel | specialisation | blocks | warps | stages | regs | stack B | shared KiB | fits "
          "| access B | mma |")
    print("|------|-------|--------|----------------|--------|-------|--------|------|---------|------------|------"
          "|----------|-----|")
    failures = 0
    for arch in (int(a) for a in args.arch.split(",")):
        for dtype_name in args.dtype.split(","):
            seen = set()
            for name, (kernel, launches) in record_launches(DTYPES[dtype_name], head_dims).items():
                for launch_args, launch_kwargs in launches:
                    for config in configs_of(kernel, args.first_config):
                        kwargs = dict(launch_kwargs, **(config.all_kwargs() if config else {}))
                        blocks, warps, stages, fixed = describe(kwargs)
                        # Triton compiles an integer argument equal to 1 as a constant (a unit stride:
                        # contiguous loads), so launches differing only there compile differently.
                        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
                        ones = [f"{n}=1" for n, a in zip(fn.arg_names, launch_args) if type(a) is int and a == 1]
                        fixed = ",".join(filter(None, [fixed, *ones]))
                        dtypes = tuple(str(getattr(a, "dtype", "")) for a in launch_args)
                        key = (name, blocks, warps, stages, fixed, dtypes)
                        if key in seen:
                            continue
                        seen.add(key)
                        row = f"| sm_{arch} | {dtype_name} | {name} | {fixed} | {blocks} | {warps} | {stages} |"
                        try:
                            compiled = compile_launch(kernel, launch_args, kwargs, arch)
                        except Exception as e:  # report every failure, not only the first
                            failures += 1
                            print(f"{row} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]} |||", flush=True)
                            continue
                        regs, stack, static, access, mma = resource_usage(compiled)
                        shared = compiled.metadata.shared + static
                        fits = "yes" if shared <= SHARED_LIMIT.get(arch, 0) else "no (autotuner skips it)"
                        print(f"{row} {regs} | {stack} | {shared / 1024:.0f} | {fits} | {access} | {mma} |", flush=True)
    if failures:
        print(f"\n{failures} compile(s) failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
