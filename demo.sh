#!/usr/bin/env bash
# The whole recipe on a CPU in about 11 minutes (2 cores): the Python standard library as a corpus,
# cleaned and deduplicated by the prep pipeline -> a byte-level BPE tokenizer -> token
# shards -> pretraining a tiny Llama -> samples -> a draft model -> int8 and speculative decoding
# -> SFT and DPO on a synthetic chat set, and a one-page report.md of the run. RUN=dir, STEPS=n
# and DRAFT_STEPS=n override the defaults.
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

echo "== [$(( $(date +%s) - start ))s] 1-3/8 data: recipes/demo.toml: every .py file of this Python's standard library (code +"
echo "   English docstrings) -> code filter, exact + MinHash dedup, PII, shuffle -> BPE tokenizer (4096)"
echo "   -> train/val shards, as 2 tasks on 2 worker processes"
python -m prep run recipes/demo.toml --out "$RUN/prep" --set "output.tokens=\"$RUN/tokens\"" --tasks 2 --workers 2

echo "== [$(( $(date +%s) - start ))s] 4/8 pretrain (configs/tiny.toml, $STEPS steps)"
python train.py --config configs/tiny.toml --set "log.dir=\"$RUN\"" --set "optim.steps=$STEPS" \
    --set "data.train=\"$RUN/tokens/train_*.bin\"" --set "data.val=\"$RUN/tokens/val_*.bin\""

echo "== [$(( $(date +%s) - start ))s] 5/8 sample from the last checkpoint"
last=$(ls -d "$RUN"/checkpoints/step_* | tail -n 1)
python infer.py --checkpoint "$last" --prompt "def " --prompt "class " --prompt "import os" \
    --max-new-tokens 80 --report "$RUN/report.md"

echo "== [$(( $(date +%s) - start ))s] 6/8 a draft for speculative decoding: a 10x smaller model on the same tokens ($DRAFT_STEPS steps)"
python train.py --config configs/tiny.toml --set "log.dir=\"$RUN/draft\"" --set "optim.steps=$DRAFT_STEPS" \
    --set model.d_model=64 --set model.n_layers=2 --set model.n_heads=2 --set model.n_kv_heads=1 \
    --set "checkpoint.every=$DRAFT_STEPS" --set eval.val_every=0 \
    --set "data.train=\"$RUN/tokens/train_*.bin\"" --set "data.val=\"$RUN/tokens/val_*.bin\""
draft=$(ls -d "$RUN"/draft/checkpoints/step_* | tail -n 1)

echo "== [$(( $(date +%s) - start ))s] 7/8 int8 and speculative samples; decode speed, acceptance and int8/int4 perplexity into report.md"
python infer.py --checkpoint "$last" --quantize int8 --prompt "def " --max-new-tokens 80 --report "$RUN/report.md"
python infer.py --checkpoint "$last" --draft "$draft" --prompt "class " --temperature 0 --max-new-tokens 80 \
    --report "$RUN/report.md"
python bench/decode.py --checkpoint "$last" --draft "$draft" --val "$RUN/tokens/val_*.bin" --report "$RUN/report.md"

echo "== [$(( $(date +%s) - start ))s] 8/8 align: SFT on a synthetic chat set (configs/sft-tiny.toml), then DPO toward its answer format"
echo "   (\"a, b, c.\" over \"a b c\", configs/dpo-tiny.toml); held-out preference accuracy goes from 0 to ~1"
python align.py --demo-data "$RUN/align"
python align.py --config configs/sft-tiny.toml --set "train.init_from=\"$last\"" --set "log.dir=\"$RUN/sft\"" \
    --set "align.train=\"$RUN/align/sft.jsonl\"" --set "align.val=\"$RUN/align/sft_val.jsonl\""
sft=$(ls -d "$RUN"/sft/checkpoints/step_* | tail -n 1)
python align.py --config configs/dpo-tiny.toml --set "train.init_from=\"$sft\"" --set "log.dir=\"$RUN/dpo\"" \
    --set "align.train=\"$RUN/align/dpo.jsonl\"" --set "align.val=\"$RUN/align/dpo_val.jsonl\""
aligned=$(ls -d "$RUN"/dpo/checkpoints/step_* | tail -n 1)
cat "$RUN/sft/report.md" "$RUN/dpo/report.md" >> "$RUN/report.md"
python infer.py --checkpoint "$aligned" --prompt "<|bos|><|user|>List these names: print open while<|end|><|assistant|>" \
    --temperature 0 --max-new-tokens 24 --report "$RUN/report.md"
echo "   serve the aligned model with its chat page: python infer.py --serve --checkpoint $aligned"

if python -c "import matplotlib" 2>/dev/null; then  # an optional extra
    python scripts/plot.py "$RUN" --out curves.png --report "$RUN/report.md"
else
    echo "   pip install matplotlib to draw the training curves into report.md (scripts/plot.py)"
fi

echo "== done in $(( $(date +%s) - start ))s; the report card is $RUN/report.md"
