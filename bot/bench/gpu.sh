#!/usr/bin/env bash
# The CUDA checks, for a session that has a GPU (none was lent when this was written):
#   1. the CUDA tests (tests/test_engine_cuda.py; they skip without a GPU),
#   2. `aigc-bot bench --peers` on a randomly initialised GPT-2 124M (no hub download)
#      at 1, 32 and 128 users, fp16 on CUDA, against transformers and CTranslate2 on CUDA.
# Results (tests log, JSON, table, plot) go to $OUT (default: ./bench-gpu); the model to
# $MODEL_DIR (default: a temporary directory). Usage: bash bot/bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-bench-gpu}
TURNS=${TURNS:-10}
MODEL_DIR=${MODEL_DIR:-$(mktemp -d)/gpt2-124m-random}
mkdir -p "$OUT"

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; print(torch.cuda.get_device_name())" | tee "$OUT/gpu.txt"
"$PY" -m pytest -q -p no:cacheprovider tests/test_engine_cuda.py 2>&1 | tee "$OUT/cuda-tests.txt"
"$PY" -m bot.bench.random_gpt2 "$MODEL_DIR"

# 128 rows of 1,024 positions in fp16 need ~4.8 GB of keys/values: raise the budget.
export AIGC_BOT__TEXT__DEVICE=cuda
export AIGC_BOT__TEXT__KV_CACHE_MB=${KV_CACHE_MB:-16384}
export AIGC_BOT__TEXT__MAX_BATCH_SIZE=128
export AIGC_BOT__DRAW__ENABLED=false
"$PY" -m bot.cli bench --peers --model "$MODEL_DIR" --users 1,32,128 --turns "$TURNS" \
    --json --plot "$OUT/bench-gpu.png" > "$OUT/bench-gpu.json"
"$PY" - "$OUT/bench-gpu.json" <<'PY' | tee "$OUT/bench-gpu.txt"
import json, sys
from bot.bench.peer_report import format_peers
print(format_peers(json.load(open(sys.argv[1], encoding="utf-8"))))
PY
