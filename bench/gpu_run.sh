#!/usr/bin/env bash
# One device call: install carried wheels (if any), then run the GPU checks named as arguments.
# Usage (on the GPU host, from the repository root): bash bench/gpu_run.sh attention dit_forward
set -uo pipefail
# The device copy carries no git metadata: the caller passes the commit, e.g. X2V_GIT_COMMIT=$(git rev-parse HEAD).
if ls .whl*/*.whl >/dev/null 2>&1; then  # .whl/ (nvidia-modelopt ...) and .whl-av/ (PyAV), whichever was carried
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl*/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
mkdir -p /tmp/x2vpkg/x2v && for p in export runtime plugins calibration configs; do ln -sfn $PWD/$p /tmp/x2vpkg/x2v/$p; done
export PYTHONPATH=/tmp/x2vpkg:$PYTHONPATH
out=${OUT:-bench/results}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for job in "$@"; do
  echo "=== $job"
  python3 bench/$job.py --out "$out" 2>&1 | tee "$out/$job.log"
done
