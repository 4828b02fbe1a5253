#!/usr/bin/env bash
# Issue 6's GPU measurements, in parts that each fit one 10-minute call of a lent GPU machine (docs/performance.md,
# "A GPU session"). Results land in $OUT (the device tool brings that folder back) or bench/results/gpu/.
#
#   bash bench/gpu_session.sh tests      # pytest -m gpu: fp16 resume, per-phase peaks, ours == diffusers, SDPA kernel
#   bash bench/gpu_session.sh bench      # ours vs diffusers(+peft), 1024 px fp16: forward, LoRA step, 30-step sampling,
#                                        # class images (bench/bench.py)
#   bash bench/gpu_session.sh variants   # LoRA step at batch 2 (prior preservation), without checkpointing, channels_last
#   bash bench/gpu_session.sh compile    # torch.compile of the UNet call, LoRA step and forward (IMPLS=ours to split)
#   bash bench/gpu_session.sh finetune   # finetune.py end to end on random full-size SDXL weights at 1024 px (peak GPU
#                                        # memory per phase: load, class images, cache, train, save, validation) + sample.py
#   DRYRUN=1 bash bench/gpu_session.sh all   # the same commands on the CPU at a tiny config (~8 min, mostly compiling)
#
# The device machine has torch, transformers, peft, safetensors, einops, tqdm but no diffusers: carry its wheel
# (docs/performance.md says how) in .whl/, which is installed here first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "${DRYRUN:-0}" = 1 ]; then  # CPU, tiny config: checks the commands, measures nothing
  DEV=cpu; CFG=tiny_sdxl; RES=64; MP=bf16
  BENCH=(--device cpu --config tiny_sdxl --latent 8 --precision bf16 --steps 2 --threads 1)
  FT=(--steps 4 --num-class-images 2 --class-steps 2 --validation-steps 2 --save-every 2 --validate-every 2)
else
  DEV=cuda; CFG=sdxl; RES=1024; MP=fp16
  BENCH=(--device cuda --resolution 1024 --precision fp16 --steps 30)
  FT=(--steps 40 --num-class-images 8 --class-steps 30 --validation-steps 30 --save-every 20 --validate-every 20
      --gradient-checkpointing)
fi

info() {
  "$PY" - <<'EOF'
import torch, transformers
try:
    import diffusers, peft
    oracle = f"diffusers {diffusers.__version__}, peft {peft.__version__}"
except ImportError as e:
    oracle = f"no oracle ({e})"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"[gpu_session] {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); transformers "
      f"{transformers.__version__}; {oracle}")
EOF
}

part_tests() {
  "$PY" -m pytest -q -rA -s -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/tests.log"
}

part_bench() {
  "$PY" bench/bench.py "${BENCH[@]}" --json "$OUT/bench-$RES-$MP.json"
}

part_variants() {
  "$PY" bench/bench.py "${BENCH[@]}" --tasks train --batch 2 --json "$OUT/bench-$RES-$MP-batch2.json"
  "$PY" bench/bench.py "${BENCH[@]}" --tasks train --no-checkpointing --json "$OUT/bench-$RES-$MP-nockpt.json"
  "$PY" bench/bench.py "${BENCH[@]}" --tasks forward,train --channels-last --json "$OUT/bench-$RES-$MP-cl.json"
}

part_compile() {  # compiling the full UNet takes minutes per worker: split with IMPLS=ours / IMPLS=diffusers
  "$PY" bench/bench.py "${BENCH[@]}" --tasks "${TASKS:-train,forward}" --impls "${IMPLS:-ours,diffusers}" --compile \
    --reps 4 --train-steps 4 --json "$OUT/bench-$RES-$MP-compile-${IMPLS:-both}.json"
}

part_finetune() {
  local model=/tmp/minidiff-random-$CFG run=/tmp/minidiff-finetune-$CFG
  [ -f "$model/model_index.json" ] || "$PY" bench/weights.py "$model" --config "$CFG" --device "$DEV"
  rm -rf "$run"
  "$PY" finetune.py --model "$model" --resolution "$RES" --mixed-precision "$MP" --device "$DEV" "${FT[@]}" \
    --validation-images 1 --out "$run" 2>&1 | grep -v "it/s" | tee "$OUT/finetune.log"
  cp "$run/manifest.json" "$OUT/finetune-manifest.json"
  "$PY" sample.py --model "$model" --lora "$run/lora.safetensors" --prompt "a picture of sks girl" \
    --width "$RES" --height "$RES" --steps 30 --num 2 --batch-size 1 --device "$DEV" --out "$run/samples-after" \
    2>&1 | grep -v "it/s" | tee "$OUT/sample.log"
}

info
case "${1:-}" in
  tests|bench|variants|compile|finetune) "part_$1" ;;
  all) for p in tests bench variants compile finetune; do "part_$p"; done ;;
  *) echo "usage: bash bench/gpu_session.sh tests|bench|variants|compile|finetune|all" >&2; exit 2 ;;
esac
echo "[gpu_session] $1 done; results in $OUT"
