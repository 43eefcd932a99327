#!/usr/bin/env bash
# The main job on the built-in default model (SmolLM2-135M-Instruct, offline, CPU):
# train a soft prompt and its classification head on the demo tweets, evaluate them on held-out
# demo tweets, save, predict.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
DEMO=src/softprompt/demo
OUT=${OUT:-runs/demo}
set -x
# the recommended recipe (the defaults: an 8-token prompt and a pooled classification head),
# 5 epochs of these 160 rows (about the optimiser steps its 10 epochs take on 80 rows)
softprompt train --data $DEMO/complaints_train.csv --text-column "Tweet text" --label-column Label \
  --out "$OUT" --overwrite --epochs 5 ${DEMO_ARGS:-}
softprompt eval "$OUT" --data $DEMO/complaints_test.csv --output "$OUT/test_metrics.json" --overwrite
softprompt predict "$OUT" "@ZephyrMobile third day without signal and your chat keeps disconnecting me" \
  "@NorthRailUK thanks, the new timetable looks great"
softprompt predict "$OUT" --data $DEMO/complaints_test.csv --output "$OUT/test_predictions.csv" --overwrite
