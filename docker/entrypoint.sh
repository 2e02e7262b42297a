#!/usr/bin/env bash
# Teacher image entrypoint: turn TEACHER_* environment variables into one `teacher-server` command and exec it.
#
#   TEACHER_MODEL=Qwen/Qwen3-8B TEACHER_TP_SIZE=2 entrypoint.sh [extra teacher-server args...]
#   -> exec teacher-server --backend vllm --model Qwen/Qwen3-8B --host 0.0.0.0 --port 8000 \
#        --tensor-parallel-size 2 [extra args...]
#
# An empty variable counts as unset (compose's `${VAR:-}` yields empty strings), so the server's own default
# applies. TEACHER_API_KEY is deliberately NOT turned into --api-key: the server reads it from the environment
# itself, which keeps the key out of `ps`, `docker inspect`'s command and the command echoed below.
# TEACHER_PRINT_ONLY=1 prints the final command (shell-quoted, one line on stdout) and exits without starting
# anything; the tests use it, and they also start a real server through this very script.
set -euo pipefail

die() {
    echo "teacher-entrypoint: $*" >&2
    exit 64  # EX_USAGE: a configuration error, not a crash
}

# is_true VAR VALUE -> 0 for 1/true/yes/on, 1 for 0/false/no/off/empty; anything else is an error.
is_true() {
    case "${2,,}" in
        1 | true | yes | on) return 0 ;;
        "" | 0 | false | no | off) return 1 ;;
        *) die "$1='$2' is not a boolean; use 1/true/yes/on or 0/false/no/off" ;;
    esac
}

[[ -n "${TEACHER_MODEL:-}" ]] ||
    die "TEACHER_MODEL is not set: give a Hugging Face hub id (e.g. Qwen/Qwen3-8B) or a path inside the container"

# Inside a container the server must listen on all interfaces, or the published port reaches nothing.
cmd=(teacher-server
    --backend "${TEACHER_BACKEND:-vllm}"
    --model "$TEACHER_MODEL"
    --host "${TEACHER_HOST:-0.0.0.0}"
    --port "${TEACHER_PORT:-8000}")

# VAR -> --flag, passed only when the variable is non-empty.
optional_flags=(
    TEACHER_SERVED_MODEL_NAME:--served-model-name
    TEACHER_DTYPE:--dtype
    TEACHER_TP_SIZE:--tensor-parallel-size
    TEACHER_MAX_TOP_K:--max-top-k
    TEACHER_MAX_MODEL_LEN:--max-model-len
    TEACHER_GPU_MEMORY_UTILIZATION:--gpu-memory-utilization
    TEACHER_MAX_NUM_BATCHED_TOKENS:--max-num-batched-tokens
    TEACHER_ENGINE_ARGS:--engine-args
    TEACHER_LOG_LEVEL:--log-level
)
for pair in "${optional_flags[@]}"; do
    var=${pair%%:*}
    if [[ -n "${!var:-}" ]]; then
        cmd+=("${pair#*:}" "${!var}")
    fi
done

if is_true TEACHER_ENFORCE_EAGER "${TEACHER_ENFORCE_EAGER:-}"; then cmd+=(--enforce-eager); fi
if is_true TEACHER_TRUST_REMOTE_CODE "${TEACHER_TRUST_REMOTE_CODE:-}"; then cmd+=(--trust-remote-code); fi

# Extra CLI args from the environment, split on whitespace (no globbing, no quote processing): for a value
# with spaces, use its own variable above or pass it as an argument after the image name / in `command:`.
if [[ -n "${TEACHER_EXTRA_ARGS:-}" ]]; then
    read -r -a extra <<<"$TEACHER_EXTRA_ARGS"
    cmd+=("${extra[@]}")
fi
cmd+=("$@")

quoted=$(printf '%q ' "${cmd[@]}")
quoted=${quoted% }
if is_true TEACHER_PRINT_ONLY "${TEACHER_PRINT_ONLY:-}"; then
    echo "$quoted"
    exit 0
fi

# Echo the command into the container log; it never holds the API key (see above).
echo "teacher-entrypoint: exec $quoted" >&2
exec "${cmd[@]}"
