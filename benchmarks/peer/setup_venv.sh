#!/usr/bin/env bash
# The peer SASRec's own virtualenv (issue 11 point 4): RecTools 0.19.0 pins
# pytorch-lightning<=2.5.2 and numpy<2, which clash with the project's lightning 2.6 / numpy 2,
# so it never goes into the project's .venv.
#   bash benchmarks/peer/setup_venv.sh [VENV]      # default benchmarks/peer/.venv (git-ignored)
# torch is pinned FIRST, as in the Makefile, so the CPU wheel is used and no CUDA build is pulled.
set -euo pipefail
VENV="${1:-$(dirname "$0")/.venv}"
PY="${PY:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "rectools[torch]==0.19.0" "pyarrow==21.0.0"  # newer pyarrow wants numpy 2
"$VENV/bin/python" -c "import rectools, torch; print('rectools', rectools.__version__, 'torch', torch.__version__)"
