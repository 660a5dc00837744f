#!/usr/bin/env bash
# Build .venv-peer: pyreft 0.1.0 (on pyvene) for the benchmark comparison, beside our .venv.
#
# pyreft pins transformers==4.45.1 and pulls in jupyter, wandb, plotnine, ydata-profiling...; none of
# that is needed to train or generate, so pyreft and pyvene go in with --no-deps and only the
# dependencies they import come after. torch stays at the version our .venv uses (a constraint file),
# so both sides run the same kernels. Idempotent: a finished venv is left as it is.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${PEER_VENV:-.venv-peer}
TORCH=${TORCH_VERSION:-2.13.0}
if [ -f "$VENV/.installed" ]; then
    exit 0
fi
python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
constraint=$(mktemp)
trap 'rm -f "$constraint"' EXIT
echo "torch==$TORCH" >"$constraint"
$PIP install "torch==$TORCH"
$PIP install --no-deps pyreft==0.1.0 pyvene==0.1.8
$PIP install -c "$constraint" transformers==4.45.1 datasets accelerate sentencepiece protobuf 'numpy<2' matplotlib 'pyarrow<20'
"$VENV/bin/python" -c "import pyreft, pyvene, transformers, torch; print('peer venv:', 'pyreft', 'pyvene', pyvene.__version__ if hasattr(pyvene, '__version__') else '', 'transformers', transformers.__version__, 'torch', torch.__version__)"
touch "$VENV/.installed"
