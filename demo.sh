#!/usr/bin/env bash
# The whole recipe on a CPU in about 10 minutes: the Python standard library as a corpus
# -> a byte-level BPE tokenizer -> token shards -> pretraining a tiny Llama -> samples,
# and a one-page report.md of the run. RUN=dir and STEPS=n override the defaults.
set -euo pipefail
cd "$(dirname "$0")"
RUN=${RUN:-runs/demo}
STEPS=${STEPS:-600}
mkdir -p "$RUN"
start=$(date +%s)

echo "== 1/5 corpus: every .py file of this Python's standard library (code + English docstrings)"
python -m prep corpus --tree stdlib --suffix .py --out "$RUN/docs.jsonl.gz"

echo "== 2/5 tokenizer: byte-level BPE, 4096 tokens, trained on a 10M-character sample"
python -m prep tokenizer --docs "$RUN/docs.jsonl.gz" --vocab-size 4096 --sample-chars 10000000 \
    --out "$RUN/tokenizer.json"

echo "== 3/5 tokenize into train/val shards with 2 worker processes"
python -m prep tokenize --docs "$RUN/docs.jsonl.gz" --tokenizer "$RUN/tokenizer.json" --out "$RUN/tokens" --workers 2

echo "== 4/5 pretrain (configs/tiny.toml, $STEPS steps)"
python train.py --config configs/tiny.toml --set "log.dir=\"$RUN\"" --set "optim.steps=$STEPS" \
    --set "data.train=\"$RUN/tokens/train_*.bin\"" --set "data.val=\"$RUN/tokens/val_*.bin\""

echo "== 5/5 sample from the last checkpoint"
last=$(ls -d "$RUN"/checkpoints/step_* | tail -n 1)
python infer.py --checkpoint "$last" --prompt "def " --prompt "class " --prompt "import os" \
    --max-new-tokens 80 --report "$RUN/report.md"

echo "== done in $(( $(date +%s) - start ))s; the report card is $RUN/report.md"
