#!/usr/bin/env bash
# The GPU check (issue 19), in one command on a machine with an NVIDIA GPU:
#
#     bash bench/gpu/check.sh            # STEPS=10 bash bench/gpu/check.sh for a shorter run
#     PY=python3 bash bench/gpu/check.sh # an environment that has tuneq's dependencies
#                                        # already (offline machines): no make venv
#
# 1. the venv (`make venv`, with TORCH=torch so pip takes a CUDA build of torch when the
#    venv is new) and bitsandbytes (the qlora extra) into it;
# 2. `nvidia-smi -L`;
# 3. the GPU-only tests: every test marked `gpu` (skipped on a machine without CUDA, so
#    `make test` never runs them there), tests/test_distributed.py apart;
# 4. bench/gpu/throughput.py: one table, rows fp32 / bf16 / fp16 LoRA, QLoRA nf4, gradient
#    checkpointing, and with 2 GPUs or more tests/test_distributed.py -m gpu as the DDP row.
#
# It stops at the first step that fails; the tests' failures do not stop the table.
set -euo pipefail
cd "$(dirname "$0")/../.."

STEPS="${STEPS:-30}"

command -v nvidia-smi >/dev/null || { echo "check.sh: no nvidia-smi: this is not a GPU machine" >&2; exit 2; }
if [ -z "${PY:-}" ]; then
    make venv TORCH="${TORCH:-torch}"
    PY=.venv/bin/python
fi
$PY -c 'import bitsandbytes' 2>/dev/null || $PY -m pip install -q 'bitsandbytes>=0.46'

echo "== GPUs"
nvidia-smi -L
$PY -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA device: install a CUDA build of torch (make TORCH=torch venv in a fresh clone)"; print("torch", torch.__version__, "CUDA", torch.version.cuda)'

echo "== GPU-only tests (pytest -m gpu)"
tests_status=0
PYTHONPATH=$PWD $PY -m pytest -q -p no:cacheprovider -m gpu --ignore=tests/test_distributed.py tests || tests_status=$?

echo "== throughput (bench/gpu/throughput.py --steps $STEPS)"
PYTHONPATH=$PWD $PY bench/gpu/throughput.py --steps "$STEPS"

echo "== GPU-only tests: $([ "$tests_status" = 0 ] && echo passed || echo "FAILED (exit $tests_status)")"
exit "$tests_status"
