#!/usr/bin/env bash
# Everything that needs a GPU, in one call of under ten minutes: the kernel benchmarks for
# README's tables, the kernel tests on real hardware, and training throughput (MFU), eager
# and compiled.
#
#     bash bench/gpu.sh                 # results in bench/gpu-results/, or in $OUT if set
#
# Each step has its own time limit and writes its own file as it goes, so a step that runs
# long costs only itself and a cut run keeps what it measured. The attention table comes
# first: it is what the README is missing and what the tuning decisions (block sizes)
# are read from. The tests compile many autotune configs on first use,
# which is most of their time.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-bench/gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep the output, show its end
    local name=$1 limit=$2
    shift 2
    echo "=== $name (at most ${limit}s): $*"
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    tail -n 60 "$out/$name.txt"
    echo "=== $name: exit $rc$([ $rc = 124 ] && echo ' (time limit)')"
}

{
    date -u +%Y-%m-%d
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} >"$out/device.txt" 2>&1
cat "$out/device.txt"

step attention 230 python3 bench/kernel_speed.py --only attention --seqs 1024,4096,16384
step rowwise 80 python3 bench/kernel_speed.py --only rowwise
step tests 150 python3 -m pytest -q tests/test_kernels.py
step mfu-125m 45 python3 bench/mfu.py --config configs/llama-125m.toml --steps 10 --warmup 3 \
    --set data.grad_accum=1 --set train.compile=false
# The same under torch.compile (the config's default). Dynamo traces the Triton kernels'
# autograd.Functions into one graph (tests/test_kernels.py checks that on a CPU); this
# measures what inductor gains around them.
step mfu-125m-compiled 75 python3 bench/mfu.py --config configs/llama-125m.toml --steps 10 --warmup 3 \
    --set data.grad_accum=1
