#!/usr/bin/env bash
# The paper's recipe end to end on tiny local models: CPU, no downloads, about two minutes.
#
#   dedup -> generate -> filter -> sft -> probe -> preflight -> train -> eval
#
# Usage:  docs/recipe_e2e.sh [WORKDIR]          (default runs/recipe; run from the repository root)
# Sizes come from the environment (defaults in brackets): N_PROMPTS [100], TEACHER_STEPS [150],
# GEN_N [2], MAX_TOKENS [40], SFT_STEPS [60], PROBE_SAMPLE [16], PREFLIGHT_STEPS [4], TRAIN_STEPS [8],
# N_BENCH [20]. PYTHON picks the interpreter [python]; DEDUP_MODEL (a sentence-transformers directory) adds
# the semantic dedup stage at DEDUP_THRESHOLD [0.6].
#
# The task: single-digit additions, answered as "a + b = s. The answer is \boxed{s}." The tiny teacher from
# `student-trainer tiny` has random weights, so it is first taught the task with `student-trainer sft` (a
# stand-in for a post-trained teacher); the tiny student then goes through the recipe. Tiny models learn
# little in a few steps: the point is that every command runs and hands its output to the next.
set -euo pipefail

WORK=${1:-runs/recipe}
PY=${PYTHON:-python}
N_PROMPTS=${N_PROMPTS:-100}
TEACHER_STEPS=${TEACHER_STEPS:-150}
GEN_N=${GEN_N:-2}
MAX_TOKENS=${MAX_TOKENS:-40}
SFT_STEPS=${SFT_STEPS:-60}
PROBE_SAMPLE=${PROBE_SAMPLE:-16}
PREFLIGHT_STEPS=${PREFLIGHT_STEPS:-4}
TRAIN_STEPS=${TRAIN_STEPS:-8}
N_BENCH=${N_BENCH:-20}
# tiny models: one thread per process is fastest, and much faster on a busy machine
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
st() { "$PY" -m student_trainer "$@"; }
step() { printf '\n=== %s\n' "$*"; }

mkdir -p "$WORK"
step "0. tiny models and a synthetic task in $WORK"
st tiny "$WORK/models"
"$PY" - "$WORK" "$N_PROMPTS" "$N_BENCH" <<'EOF'
import json, random, sys
from pathlib import Path

work, n_prompts, n_bench = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
SUFFIX = " Put the final answer in \\boxed{}."
pairs = [(a, b) for a in range(10) for b in range(10)]
random.Random(0).shuffle(pairs)
bench = pairs[:n_bench]
def write(name, rows):
    with open(work / name, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
def solution(a, b):
    return f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."
# benchmark (held out); the prompt set repeats its problems with the instruction suffix: dedup removes them
write("benchmark.jsonl", [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in bench])
write("prompts.jsonl", [{"id": f"p{i}", "question": f"What is {a} + {b}?" + (SUFFIX if i % 2 else ""),
                         "answer": str(a + b)} for i, (a, b) in enumerate(pairs[:n_prompts])])
write("teacher_sft.jsonl", [{"question": f"What is {a} + {b}?", "completion": solution(a, b)} for a, b in pairs])
EOF

step "teach the tiny teacher the task (stand-in for a post-trained teacher)"
st sft --model "$WORK/models/teacher" --data "$WORK/teacher_sft.jsonl" --output-dir "$WORK/teacher" \
    --steps "$TEACHER_STEPS" --batch-size 16 --micro-batch 16 --lr 3e-3 --schedule constant --no-plot

step "1. dedup: drop training prompts that are benchmark problems"
DEDUP_ARGS=(--exact-only)
if [[ -n "${DEDUP_MODEL:-}" ]]; then
    DEDUP_ARGS=(--model "$DEDUP_MODEL" --threshold "${DEDUP_THRESHOLD:-0.6}" --no-progress)
fi
st dedup "$WORK/prompts.jsonl" --reference "$WORK/benchmark.jsonl" --out "$WORK/prompts.dedup.jsonl" \
    --strip-suffix "Put the final answer in \\boxed{}." "${DEDUP_ARGS[@]}"

step "serve the teacher (a real teacher-server process)"
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
"$PY" -m teacher_server --model "$WORK/teacher" --port "$PORT" --max-model-len 512 >"$WORK/teacher.log" 2>&1 &
TEACHER_PID=$!
trap 'kill "$TEACHER_PID" 2>/dev/null || true; wait "$TEACHER_PID" 2>/dev/null || true' EXIT
"$PY" - "$URL" "$TEACHER_PID" <<'EOF'
import os, sys, time, httpx
url, pid = sys.argv[1], int(sys.argv[2])
for _ in range(600):
    try:
        if httpx.get(url + "/ready", timeout=2).status_code == 200:
            print(f"teacher-server ready at {url}")
            sys.exit(0)
    except httpx.HTTPError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("teacher-server exited; see its log")
    time.sleep(0.2)
sys.exit("teacher-server not ready after 120 s")
EOF

step "2. generate: teacher rollouts (chat form, the teacher's template)"
st generate --teacher-url "$URL" --data "$WORK/prompts.dedup.jsonl" --id-field id --answer-field answer \
    --out "$WORK/rollouts.jsonl" --n "$GEN_N" --max-tokens "$MAX_TOKENS" --concurrency 4 --no-progress

step "3. filter: drop incomplete, repetitive and empty rollouts"
st filter "$WORK/rollouts.jsonl" --out "$WORK/rollouts.kept.jsonl" --tokenizer "$WORK/teacher"

step "4. sft: cold start of the student on the kept rollouts"
st sft --model "$WORK/models/student" --data "$WORK/rollouts.kept.jsonl" --output-dir "$WORK/student_sft" \
    --steps "$SFT_STEPS" --batch-size 16 --micro-batch 16 --lr 3e-3 --schedule constant --no-plot

COMMON=(--student "$WORK/student_sft" --teacher-url "$URL" --data "$WORK/prompts.dedup.jsonl"
    --max-new-tokens "$MAX_TOKENS" --sample "$PROBE_SAMPLE" logging.progress_bar=false logging.plot=false
    train.sample_every=0)

step "5. probe: which prompt template aligns the student with the teacher"
st probe "${COMMON[@]}" --out "$WORK/template.yaml" --report "$WORK/probe.json"

step "6. preflight: a few OPD steps and a verdict"
st preflight "${COMMON[@]}" --template chat --teacher-prompt same --teacher-prompt chat \
    --steps "$PREFLIGHT_STEPS" --lr 1e-4 --workdir "$WORK/preflight"

step "7. train: on-policy distillation with the probed template"
st train --config "$WORK/template.yaml" model.student="$WORK/student_sft" "teacher.urls=[$URL]" \
    data.path="$WORK/prompts.dedup.jsonl" train.steps="$TRAIN_STEPS" train.prompts_per_step=16 \
    train.micro_batch_prompts=16 rollout.max_new_tokens="$MAX_TOKENS" optim.lr=1e-4 \
    train.output_dir="$WORK/opd" train.save_every=0 train.sample_every=0 logging.progress_bar=false \
    logging.plot=false

step "8. eval: the benchmark, before and after OPD"
for model in student_sft opd; do
    st eval --model "$WORK/$model" --data "$WORK/benchmark.jsonl" --greedy --max-new-tokens "$MAX_TOKENS" \
        --out "$WORK/eval_$model.jsonl" | tail -n 2
done
echo "recipe done: $WORK"
