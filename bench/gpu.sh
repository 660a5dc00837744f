#!/usr/bin/env bash
# On a CUDA machine (torch and transformers installed, nothing downloaded): the CUDA tests, then the
# training-step, generation and mixed-adapter ratios of bench/gpu.py on random-weight bf16 models
# shaped like SmolLM2-135M and LLaMA-7B. Under 8 minutes in all (each part has its own time limit).
#
#   bash bench/gpu.sh                 # from anywhere; PYTHON=... picks the interpreter
#   bash bench/gpu.sh --device cpu --tiny    # the same code on CPU with a tiny model (no tests run)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python}"
status=0

echo "== $("$PY" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda", torch.cuda.is_available() and torch.cuda.get_device_name())')"
"$PY" -c 'import peft; print(f"== peft {peft.__version__}: mixed-batch generation is compared with its LoRA")' 2>/dev/null \
  || echo "== peft is not installed: mixed-batch generation is compared with plain generate only"

if [[ " $* " != *" --tiny "* ]]; then
  if ! "$PY" -c 'import pytest' 2>/dev/null; then
    echo "== pytest is not installed: CUDA tests skipped"; status=1
  else
    # tests/test_cuda.py needs only torch and transformers; a test module that cannot be imported
    # here (hypothesis missing, say) is reported and the CUDA tests of the others still run.
    echo "== CUDA tests: pytest -m cuda tests"
    timeout 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors tests || status=1
  fi
fi

echo "== bench/gpu.py $*"
timeout 300 "$PY" bench/gpu.py "$@" || status=1
exit $status
