#!/usr/bin/env bash
# One prepared run on the GPU machine (device tool): every GPU figure in docs/BENCHMARKS.md.
# Needs the wheels the image lacks in .whl/ (fastapi, starlette, pydantic, pydantic-core, annotated-types,
# typing-inspection, typing-extensions, uvicorn). Each part has its own time limit so one failure cannot
# take the others down. Outputs land in $OUT.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, fastapi; print('torch', torch.__version__, 'transformers', transformers.__version__)"
run() {  # name, seconds, command...
    local name=$1 secs=$2; shift 2
    echo "=== $name (limit ${secs}s) ==="
    local t0=$SECONDS
    timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
    echo "exit $? after $((SECONDS - t0))s"
    grep -v "Loading\|Writing\|it/s\]" "$OUT/$name.log" | tail -n 12
}
run score_17b 120 python3 bench/bench_score_service.py --preset gpu --shape qwen3-1.7b --json-out "$OUT/score_17b.json"
run score_8b 140 python3 bench/bench_score_service.py --preset gpu --shape qwen3-8b --json-out "$OUT/score_8b.json"
run trainer 220 python3 bench/bench_trainer_step.py --preset gpu --json-out "$OUT/trainer.json"
run loss_memory 40 python3 bench/bench_loss_memory.py --device cuda --tokens 16384 --hidden 2048
