#!/usr/bin/env bash
# One device session's checks (issues 3, 4, 6), in priority order, each under its own timeout so
# one hang cannot eat the rest. Logs and JSON land in $OUT. On the CPU: TINY=1 OUT=/tmp/x bash ...
#   GPU: carry .whl (wheels for diffusers/structlog, bitsandbytes unpacked in .whl/bnb_site).
set -u
OUT=${OUT:-/tmp/gpu_session}; mkdir -p "$OUT"
if [ -z "${TINY:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/.whl/bnb_site:$PWD/src:$PWD/benchmarks
  PY=python3; DEV="--device cuda"; T=""
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
else
  export PYTHONPATH=$PWD/src:$PWD/benchmarks; PY=${PY:-python3}; DEV="--device cpu"; T="--tiny"
fi
export PYTHONUNBUFFERED=1
$PY -c "import torch, bitsandbytes, diffusers; print('torch', torch.__version__, 'bnb', bitsandbytes.__version__, 'diffusers', diffusers.__version__)" 2>&1 | tail -1 | tee "$OUT/versions.txt"
B4=${B4:-4,3}; B16=${B16:-16,12}
[ -n "${TINY:-}" ] && B4=12,9 && B16=40,30
timeout "${T1:-150}" $PY benchmarks/quant_check.py --model sdxl $DEV $T --budgets $B4 --out "$OUT/quant_sdxl.json" > "$OUT/quant_sdxl.log" 2>&1; echo "quant sdxl rc=$?"
timeout "${T2:-170}" $PY benchmarks/batch_resume_check.py $DEV $T --deadline 160 --out "$OUT/batch_resume.json" > "$OUT/batch_resume.log" 2>&1; echo "batch rc=$?"
timeout "${T3:-200}" $PY benchmarks/quant_check.py --model flux $DEV $T --budgets $B16 --policies speed \
  --strategies ";nf4;int8;nf4,model_offload;fp8,group_leaf_stream;group_leaf_stream" --out "$OUT/quant_flux.json" > "$OUT/quant_flux.log" 2>&1; echo "quant flux rc=$?"
for f in quant_sdxl batch_resume quant_flux; do echo "== $f"; grep -v '^\s*$' "$OUT/$f.log" | grep -v "autofit\.\|kernels-community\|torchvision" | tail -25; done
