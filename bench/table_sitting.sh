#!/usr/bin/env bash
# The speed table in one sitting on one GPU host: bash bench/table_sitting.sh PART  (PART = 1 to 6)
# Each part fits one 10-minute device call; run them back to back (files under /tmp live while the host is
# warm). Measured on an H200 with STEPS=8 (commit 4184789): parts 1 (with the checkpoint, 60 s of it) to 6 took 166,
# 236 (with decode_write), 265, 164 and (5+6 in one call) 143 s, about 17 min of device time with the host's start; at 9889f9a calibration and
# build ran past 8 min in one call (output lost), so they are two parts now and
# every part appends its output to $OUT/table_sitting.log, which comes back even when a call times out;
# STEPS=40 (the full schedule) needs about 30 min in all. With fewer steps rows project the full run from
# their steady step times. Rows write under $OUT/table/<card>/; render where all of them are gathered.
# Wheels: every .whl*/*.whl is installed: .whl/ (nvidia-modelopt and its dependencies, parts 3 and 4) and .whl-av/
# (PyAV, for the MP4s of parts 1, 2, 5, 6); together they exceed one call's 64 MiB, so carry each where needed.
# ModelOpt imports huggingface_hub: take huggingface_hub<1 (2.x imports httpx2, which the image lacks).
# LD_PRELOAD is set for AOTInductor on the torch 2.11+cu130 image.
set -euo pipefail
STEPS=${STEPS:-40}
CKPT=${CKPT:-/tmp/x2v-ckpt}
OUT=${OUT:-bench/results}
ENG=$CKPT/engines
wheels=$(ls .whl*/*.whl 2>/dev/null || true)
[ -z "$wheels" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $wheels 2>/dev/null || true
mkdir -p /tmp/x2vpkg/x2v && for p in export runtime plugins calibration configs; do ln -sfn "$PWD/$p" /tmp/x2vpkg/x2v/$p; done
export PYTHONPATH=/tmp/x2vpkg:$PWD:/tmp/site PYTHONUNBUFFERED=1 LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6
export2() { python3 -c "from x2v.export.cli import main; main()" "$@"; }
row() { python3 -m bench.table --row "$1" --ckpt "$CKPT" --steps "$STEPS" --out "$OUT" --engines "$ENG" --work /tmp/x2v-table; }
part=${1:?part 1-6}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/table_sitting.log") 2>&1
echo "=== part $part $(date -u +%FT%TZ) commit ${X2V_GIT_COMMIT:-unknown}"
case "$part" in
  1) [ -f "$CKPT/Wan2.1_VAE.pth" ] || export2 make-checkpoint --model i2v-14b-480p --out "$CKPT" --device cuda
     row baseline ;;                                                   # ~60 s + 40 steps x ~7 s
  2) row sage-mixed; row sage-bf16
     python3 bench/decode_write.py --out "$OUT" --name decode_write_tiles ;;  # the fp8 rows' decode tiles, side by side
  3) python3 -c "import modelopt.torch.quantization"  # fail before calibrating, not after (a missing dependency cost a call)
     export2 calibrate --model i2v-14b-480p --ckpt "$CKPT" --steps 4 --steps-per-run 2 --device cuda
     export2 quantize --model i2v-14b-480p --ckpt "$CKPT" --device cuda ;;
  4) export2 build --model i2v-14b-480p --ckpt "$CKPT" --gpu "$(python3 -c 'import torch; print("h200" if "H200" in torch.cuda.get_device_name() else "h100")')" \
       --dit dit-fp8 --out "$ENG" --no-autotune --profile "$(python3 -m bench.table --print-profile)" ;;  # as measured
  5) row fp8; row fp8-teacache ;;
  6) row fp8-teacache-published; row distill ;;
esac
