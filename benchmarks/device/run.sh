#!/usr/bin/env bash
# The one command for the GPU machine (see README.md beside this file):
#   bash benchmarks/device/run.sh OUT [gpu_check.py options...]
# Installs the carried wheels (.whl/) into /tmp/site, puts them and this checkout on
# PYTHONPATH, and runs gpu_check.py with everything it prints also in OUT/gpu_check.log.
set -uo pipefail
OUT=${1:?usage: run.sh OUT [gpu_check.py options]}
shift
cd "$(dirname "$0")/../.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    echo "[run.sh $(date +%T)] installing $(ls .whl/*.whl | wc -l) wheels into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        2>&1 | tee "$OUT/install.log" || { echo "wheel install failed (see install.log)"; exit 2; }
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "[run.sh $(date +%T)] no .whl/ here: using the packages already installed"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" benchmarks/device/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
