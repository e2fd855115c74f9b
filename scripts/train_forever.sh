#!/usr/bin/env bash
# Restart training until it finishes: after a crash (any non-zero exit) or a preemption
# (exit 75, after a checkpoint), start again from the newest good checkpoint.
#   scripts/train_forever.sh configs/x.toml [--set ...]            (or: torchrun ... via TRAIN="torchrun ...")
set -u
TRAIN=${TRAIN:-python}
MAX_RESTARTS=${MAX_RESTARTS:-100}
for attempt in $(seq 0 "$MAX_RESTARTS"); do
    $TRAIN train.py --config "$@" --resume auto
    code=$?
    [ "$code" -eq 0 ] && exit 0
    echo "train.py exited with $code ($( [ "$code" -eq 75 ] && echo preempted || echo crashed )); restart $((attempt + 1))/$MAX_RESTARTS" >&2
    sleep 5
done
exit 1
