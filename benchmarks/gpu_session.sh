#!/usr/bin/env bash
# One device session's checks (issues 3, 4), in priority order, each under its own timeout so
# one hang cannot eat the rest. Logs and JSON land in $OUT. On the CPU: TINY=1 OUT=/tmp/x bash ...
#   GPU: carry .whl (wheels for diffusers/structlog/torchao, bitsandbytes unpacked in .whl/bnb_site).
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
# Priorities for the next device session (stops 9-10): re-measure what changed without a GPU.
# The timeouts add up to 570 s: one run call (600 s at most); start it with timeout_s=600.
B4=${B4:-4}; B16=${B16:-16,12}; BS=${BS:-8,6,4}
[ -n "${TINY:-}" ] && B4=12 && B16=40,30 && BS=40,12
# 1. Issue 4: Flux-sized nf4/int8 after the quantizer's skip-pattern fix, and the 16/12 GiB picks.
timeout "${T1:-160}" $PY benchmarks/quant_check.py --model flux $DEV $T --budgets $B16 --policies speed \
  --strategies ";nf4;int8;nf4,model_offload" --out "$OUT/quant_flux.json" > "$OUT/quant_flux.log" 2>&1; echo "quant flux rc=$?"
# 2. Issue 4: int8 + model offload after the int8-state fix (bitsandbytes #1332): peaks should drop.
timeout "${T2:-80}" $PY benchmarks/quant_check.py --model sdxl $DEV $T --budgets $B4 --policies speed \
  --strategies ";int8;int8,model_offload,vae_tiling;nf4,model_offload,vae_tiling" --out "$OUT/quant_sdxl.json" > "$OUT/quant_sdxl.log" 2>&1; echo "quant sdxl rc=$?"
# 3. Issue 3: first call against the oracle's own first call, SDXL-sized.
timeout "${T3:-140}" $PY benchmarks/budget_sweep.py --model sdxl $DEV $T --budgets $BS \
  --strategies ";vae_tiling;offload_for_decode;model_offload;group_leaf_stream" --out "$OUT/sweep_sdxl.json" > "$OUT/sweep_sdxl.log" 2>&1; echo "sweep sdxl rc=$?"
# 4. Issue 4: the checkpoint as the undo copy, quantizing on the GPU (verification hidden?).
timeout "${T4:-70}" $PY benchmarks/undo_copy_check.py $DEV $T --folder /tmp/undo_check > "$OUT/undo_copy.log" 2>&1; echo "undo copy rc=$?"
# 5. Issue 4: torchao int8 weight-only against bnb int8 / nf4 and fp8 (torchao 0.18 wheel in .whl).
timeout "${T5:-80}" $PY benchmarks/torchao_check.py $DEV $T --out "$OUT/torchao.json" > "$OUT/torchao.log" 2>&1; echo "torchao rc=$?"
# 6. Issue 3: pinned copies of streamed group offload, predicted vs measured; none left after a
#    switch; NVML read by UUID agrees with torch.
timeout "${T6:-40}" $PY benchmarks/pinned_check.py $DEV $T --out "$OUT/pinned.json" > "$OUT/pinned.log" 2>&1; echo "pinned rc=$?"
for f in quant_flux quant_sdxl sweep_sdxl undo_copy torchao pinned; do echo "== $f"; grep -v '^\s*$' "$OUT/$f.log" | grep -v "autofit\.\|kernels-community\|torchvision" | tail -25; done
