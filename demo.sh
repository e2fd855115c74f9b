#!/usr/bin/env bash
# The whole recipe on a CPU in about 11 minutes (2 cores): the Python standard library as a corpus,
# cleaned and deduplicated by the prep pipeline -> a byte-level BPE tokenizer -> token
# shards -> pretraining a tiny Llama -> samples -> a draft model -> int8 and speculative decoding,
# and a one-page report.md of the run. RUN=dir, STEPS=n and DRAFT_STEPS=n override the defaults.
set -euo pipefail
cd "$(dirname "$0")"
RUN=${RUN:-runs/demo}
STEPS=${STEPS:-600}
DRAFT_STEPS=${DRAFT_STEPS:-200}
if [ -e "$RUN" ]; then  # an earlier demo run is kept, moved aside
    mv "$RUN" "$RUN.$(date +%Y%m%d-%H%M%S)" && echo "moved the earlier $RUN aside"
fi
mkdir -p "$RUN"
start=$(date +%s)

echo "== 1-3/7 data: recipes/demo.toml: every .py file of this Python's standard library (code +"
echo "   English docstrings) -> code filter, exact + MinHash dedup, PII, shuffle -> BPE tokenizer (4096)"
echo "   -> train/val shards, as 2 tasks on 2 worker processes"
python -m prep run recipes/demo.toml --out "$RUN/prep" --set "output.tokens=\"$RUN/tokens\"" --tasks 2 --workers 2

echo "== 4/7 pretrain (configs/tiny.toml, $STEPS steps)"
python train.py --config configs/tiny.toml --set "log.dir=\"$RUN\"" --set "optim.steps=$STEPS" \
    --set "data.train=\"$RUN/tokens/train_*.bin\"" --set "data.val=\"$RUN/tokens/val_*.bin\""

echo "== 5/7 sample from the last checkpoint"
last=$(ls -d "$RUN"/checkpoints/step_* | tail -n 1)
python infer.py --checkpoint "$last" --prompt "def " --prompt "class " --prompt "import os" \
    --max-new-tokens 80 --report "$RUN/report.md"

echo "== 6/7 a draft for speculative decoding: a 10x smaller model on the same tokens ($DRAFT_STEPS steps)"
python train.py --config configs/tiny.toml --set "log.dir=\"$RUN/draft\"" --set "optim.steps=$DRAFT_STEPS" \
    --set model.d_model=64 --set model.n_layers=2 --set model.n_heads=2 --set model.n_kv_heads=1 \
    --set "checkpoint.every=$DRAFT_STEPS" --set eval.val_every=0 \
    --set "data.train=\"$RUN/tokens/train_*.bin\"" --set "data.val=\"$RUN/tokens/val_*.bin\""
draft=$(ls -d "$RUN"/draft/checkpoints/step_* | tail -n 1)

echo "== 7/7 int8 and speculative samples; decode speed, acceptance and int8/int4 perplexity into report.md"
python infer.py --checkpoint "$last" --quantize int8 --prompt "def " --max-new-tokens 80 --report "$RUN/report.md"
python infer.py --checkpoint "$last" --draft "$draft" --prompt "class " --temperature 0 --max-new-tokens 80 \
    --report "$RUN/report.md"
python bench/decode.py --checkpoint "$last" --draft "$draft" --val "$RUN/tokens/val_*.bin" --report "$RUN/report.md"

echo "== done in $(( $(date +%s) - start ))s; the report card is $RUN/report.md"
