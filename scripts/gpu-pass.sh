#!/usr/bin/env bash
# The GPU pass, in one bounded run on a CUDA machine (from the repository root):
#   1. the shapes teacher trained further on the GPU (from the shipped one) and bundled;
#      a quick check: DDIM 50 steps, guidance 8, 256 held-out prompts;
#   2. latent consistency distillation of that teacher, seven runs side by side on the one GPU:
#      skipping step k in {1, 5, 10, 20, 50} with DDIM, and DPM-Solver / DPM-Solver++ at k = 20;
#      the k = 20 DDIM run is bundled as shapes-lcm;
#   3. the GPU tests (CUDA-graph capture equals eager, buckets do not retrace);
#   4. lcmserve bench: SD1.5-shaped preset, 512x512, 4 steps, CUDA graphs and eager fp16 against
#      diffusers' LatentConsistencyModelPipeline on the same weights, alone on the GPU, with the top
#      kernels of one batch per row (--profile);
#   5. lcmserve eval, side by side, with the time left: the teacher (DDIM, DPM-Solver++), the LCM
#      (1/2/4/8 steps; guidance 3/5/9/15 at 4 steps) and each ablation run.
#
# Usage: scripts/gpu-pass.sh OUT_DIR [SECONDS]
# Everything is bounded by SECONDS (default 575). SKIP=teacher,lcd,tests,bench,eval leaves stages out
# (the teacher then gets their time: TEACHER_S; with the teacher left out, the shipped one is distilled and evaluated,
# and SKIP=teacher,lcd,eval is the engine's pass alone: GPU tests and benches); TEACHER_FLAGS adds flags to the
# teacher's training (e.g. --train-text-encoder --snr-gamma 5); TEACHER_AUTO=1 first times the training step per batch size and
# precision (`shapes train-speed`, AUTO_BATCHES, AUTO_VARIANTS) and trains with the fastest for the
# budget, the learning rate scaled by the square root of the batch ratio; BENCH_COMPILE=1 adds a bench of
# cuda-graph + torch.compile (BENCH_COMPILE_MODE, default: `default`, as max-autotune's tuning outlasts the budget), BENCH_CL=1 one of cuda-graph with channels-last convolutions, BENCH_TAESD=1 one of cuda-graph and diffusers
# both decoding with TAESD's architecture (--vae preset:taesd). OUT_DIR receives teacher.tgz and lcm.tgz (the
# float16 UNets and training-configs.json, to unpack into lcmserve/shapes/weights), the bench
# files, and results.tgz (evals, distillation summaries and samples, logs).
# Python packages missing on the machine may be given as wheels in .whl/ (installed to /tmp/site).
set -u
OUT=${1:?usage: scripts/gpu-pass.sh OUT_DIR [SECONDS]}
TOTAL=${2:-575}
T0=$(date +%s)
left() { echo $((TOTAL - ($(date +%s) - T0))); }
log() { echo "== [$(($(date +%s) - T0)) s] $*"; }
mkdir -p "$OUT"
RUN=${RUN_DIR:-/tmp/gpu-pass}
rm -rf "$RUN" && mkdir -p "$RUN/logs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
LCM="python3 -m lcmserve.cli"
DEV=${DEVICE:-cuda}
want() { [[ ",${SKIP:-}," != *",$1,"* ]]; }
quiet() { tr '\r' '\n' | grep -v "%|"; }  # progress bars stay out of the logs
pack() { tar -C "$RUN" -czf "$OUT/results.tgz" --exclude "*.pt" --exclude "*.safetensors" --exclude checkpoints \
  logs $(cd "$RUN" && ls -d eval-* lcd-*/distill*.json lcd-*/samples teacher/config.json 2>/dev/null); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" || exit 1

# -- 1. the teacher ----------------------------------------------------------------------------
if want teacher; then
TEACHER_S=${TEACHER_S:-160}
log "1. teacher: ${TEACHER_S} s"
T1=$(date +%s)
BATCH=${TEACHER_BATCH:-512}
LR=${TEACHER_LR:-5e-4}
SPEED_FLAGS=""
if [ -n "${TEACHER_AUTO:-}" ]; then  # time the step per batch size and precision, train with the fastest
  for f in --train-text-encoder "--snr-gamma [0-9.]*"; do
    SPEED_FLAGS="$SPEED_FLAGS $(grep -o -- "$f" <<< "${TEACHER_FLAGS:-}")"
  done
  timeout $((TEACHER_S / 3)) $LCM shapes train-speed --device "$DEV" --batch-sizes ${AUTO_BATCHES:-512,1024} \
    --variants ${AUTO_VARIANTS:-fp32,bf16,bf16+compile} --seconds 4 --budget $((TEACHER_S * 2 / 3)) $SPEED_FLAGS \
    --json "$RUN/logs/train-speed.json" > "$RUN/logs/train-speed.md" 2> "$RUN/logs/train-speed.err"
  cat "$RUN/logs/train-speed.md"
  BEST=$(sed -n 's/^best for .*: //p' "$RUN/logs/train-speed.md")
  if [ -n "$BEST" ]; then
    NEW_BATCH=$(grep -o -- "--batch-size [0-9]*" <<< "$BEST" | cut -d" " -f2)
    LR=$(python3 -c "print(f'{$LR * ($NEW_BATCH / $BATCH) ** 0.5:.3g}')")  # square-root scaling with the batch
    BATCH=$NEW_BATCH
    SPEED_FLAGS=$(sed "s/--batch-size [0-9]*//" <<< "$BEST")
  else
    SPEED_FLAGS=""
  fi
fi
TEACHER_LEFT=$((TEACHER_S - ($(date +%s) - T1)))
log "teacher: batch $BATCH, lr $LR, flags: ${TEACHER_FLAGS:-} $SPEED_FLAGS; ${TEACHER_LEFT} s"
$LCM shapes train teacher --out "$RUN/teacher" --clip shipped --vae shipped --init-unet shipped \
  --device "$DEV" --steps ${TEACHER_STEPS:-60000} --batch-size "$BATCH" --lr "$LR" \
  --warmup-steps 200 --latent-cache ${LATENT_CACHE:-100000} --num-workers ${WORKERS:-8} --checkpoint-every 5000 \
  --max-minutes "$(python3 -c "print($TEACHER_LEFT / 60)")" ${TEACHER_FLAGS:-} $SPEED_FLAGS 2>&1 | quiet \
  > "$RUN/logs/teacher.log"
tail -n 4 "$RUN/logs/teacher.log"
$LCM shapes bundle --clip shipped --vae shipped --teacher "$RUN/teacher" --classifier shipped -o "$RUN/bundle" \
  2>&1 | tail -n 1
tar -C "$RUN/bundle" -czf "$OUT/teacher.tgz" shapes-teacher/unet shapes-teacher/text_encoder training-configs.json
python3 -c "import json,torch; s=torch.load('$RUN/teacher/checkpoint.pt',weights_only=False); \
json.dump({'steps': s['step'], 'losses': s['losses']}, open('$RUN/logs/teacher-losses.json','w'))"
fi
TEACHER_DIR=$RUN/bundle/shapes-teacher
[ -f "$TEACHER_DIR/unet/config.json" ] || TEACHER_DIR=lcmserve/shapes/weights/shapes-teacher  # the shipped one
if want teacher; then
log "teacher check ($TEACHER_DIR): DDIM 50, guidance 8, 256 held-out prompts"
timeout 45 $LCM eval "$TEACHER_DIR" --sampler ddim --steps 50 --guidance 8 --num-images ${EVAL_N_QUICK:-256} --batch-size 256 \
  --device "$DEV" -o "$RUN/eval-teacher-quick" 2>&1 | grep "^| \(real\|ddim\)"
fi

# -- 2. distillation: the ablation grid, side by side ----------------------------------------------
if want lcd; then
LCD_S=${LCD_S:-130}
log "2. distill lcd x7: ${LCD_S} s"
lcd() {  # name, then extra flags
  local name=$1; shift
  OMP_NUM_THREADS=2 $LCM distill lcd --teacher "$TEACHER_DIR" --out "$RUN/lcd-$name" --steps ${LCD_STEPS:-1500} \
    --batch-size ${LCD_BATCH:-256} --lr ${LCD_LR:-1e-4} --lr-warmup-steps 100 --num-samples ${LCD_SAMPLES:-20000} \
    --cache "$RUN/cache-$name.pt" --checkpoint-every 100000 --samples 8 \
    --max-minutes "$(python3 -c "print($LCD_S / 60)")" "$@" 2>&1 | quiet > "$RUN/logs/lcd-$name.log"
}
lcd k20-ddim & lcd k1-ddim --skipping-step 1 & lcd k5-ddim --skipping-step 5 & lcd k10-ddim --skipping-step 10 &
lcd k50-ddim --skipping-step 50 & lcd k20-dpmsolver --solver dpmsolver & lcd k20-dpmsolverpp --solver dpmsolver++ &
wait
grep -h "distilled\|max_minutes\|Error" "$RUN"/logs/lcd-*.log
TEACHER_RUN=$RUN/teacher
[ -d "$TEACHER_RUN" ] || TEACHER_RUN=shipped
$LCM shapes bundle --clip shipped --vae shipped --teacher "$TEACHER_RUN" --classifier shipped \
  --lcm "$RUN/lcd-k20-ddim" -o "$RUN/bundle" 2>&1 | tail -n 1
tar -C "$RUN/bundle" -czf "$OUT/lcm.tgz" --exclude shapes-lcm/vae --exclude shapes-lcm/text_encoder shapes-lcm \
  training-configs.json
pack
fi

# -- 3. GPU tests, 4. bench: alone on the GPU ---------------------------------------------------------
if want tests; then
log "3. GPU tests"
timeout 50 python3 -m pytest -q -m gpu -p no:cacheprovider \
  --deselect "tests/test_cuda_graph.py::test_captured_cfg_and_compiled_on_gpu[True-False]" \
  tests/test_cuda_graph.py tests/test_backends.py 2>&1 | tail -n 8 | tee "$RUN/logs/gpu-tests.log"
fi
if want bench; then
log "4. bench"
timeout $(( $(left) - 70 )) $LCM bench --model ${BENCH_MODEL:-preset:sd15} --device "$DEV" \
  --dtype ${BENCH_DTYPE:-float16} --backends ${BENCH_BACKENDS:-cuda-graph,torch} --batch-sizes 1,16 --steps 4 \
  --resolutions ${BENCH_SIZE:-512x512} --warmup 3 --iters ${BENCH_ITERS:-15} --profile \
  --out "$OUT" --name bench-gpu-sd15 -q > "$RUN/logs/bench.log" 2>&1
grep "^|\|failed" "$OUT/bench-gpu-sd15.md" 2>/dev/null | head -n 12
if [ -n "${BENCH_CL:-}" ]; then  # channels-last converts the model: a bench of its own
  timeout $(( $(left) - 60 )) $LCM bench --model ${BENCH_MODEL:-preset:sd15} --device "$DEV" --dtype ${BENCH_DTYPE:-float16} \
    --backends cuda-graph --channels-last --no-baseline --batch-sizes 1,16 --steps 4 --resolutions ${BENCH_SIZE:-512x512} \
    --warmup 3 --iters ${BENCH_ITERS:-15} --out "$OUT" --name bench-gpu-sd15-nhwc -q > "$RUN/logs/bench-nhwc.log" 2>&1
  grep "^|\|failed" "$OUT/bench-gpu-sd15-nhwc.md" 2>/dev/null | head -n 6
fi
if [ -n "${BENCH_TAESD:-}" ]; then  # the tiny decoder, ours and diffusers' alike
  timeout $(( $(left) - 60 )) $LCM bench --model ${BENCH_MODEL:-preset:sd15} --vae ${BENCH_VAE:-preset:taesd} --device "$DEV" \
    --dtype ${BENCH_DTYPE:-float16} --backends cuda-graph --batch-sizes 1,16 --steps 4 --resolutions ${BENCH_SIZE:-512x512} \
    --warmup 3 --iters ${BENCH_ITERS:-15} --out "$OUT" --name bench-gpu-sd15-taesd -q > "$RUN/logs/bench-taesd.log" 2>&1
  grep "^|\|failed" "$OUT/bench-gpu-sd15-taesd.md" 2>/dev/null | head -n 6
fi
# torch.compile last: its compilation is the longest, and a cut run keeps the others
if [ -n "${BENCH_COMPILE:-}" ]; then
  timeout $(( $(left) - 60 )) $LCM bench --model ${BENCH_MODEL:-preset:sd15} --device "$DEV" --dtype ${BENCH_DTYPE:-float16} \
    --backends cuda-graph --compile --compile-mode ${BENCH_COMPILE_MODE:-default} --no-baseline --batch-sizes 1,16 --steps 4 --resolutions ${BENCH_SIZE:-512x512} \
    --warmup 3 --iters ${BENCH_ITERS:-15} --out "$OUT" --name bench-gpu-sd15-compile -q > "$RUN/logs/bench-compile.log" 2>&1
  grep "^|\|failed" "$OUT/bench-gpu-sd15-compile.md" 2>/dev/null | head -n 6
fi
fi

# -- 5. evaluations, side by side ------------------------------------------------------------------
if want eval; then
EVAL_S=$(( $(left) - 12 ))
log "5. eval: ${EVAL_S} s"
ev() {  # output name, model, then flags
  local name=$1 model=$2; shift 2
  OMP_NUM_THREADS=2 timeout "$EVAL_S" $LCM eval "$model" --device "$DEV" --batch-size 500 -o "$RUN/eval-$name" "$@" \
    2>&1 | quiet > "$RUN/logs/eval-$name.log"
}
ev teacher "$TEACHER_DIR" --sampler ddim,dpmsolver++ --steps 1,2,4,8,25,50 --guidance 8 --num-images ${EVAL_N:-1000} &
ev lcm "$RUN/lcd-k20-ddim" --sampler lcm --steps 1,2,4,8 --guidance 8 --num-images ${EVAL_N:-1000} &
(for g in 3 5 9 15; do ev lcm-w$g "$RUN/lcd-k20-ddim" --sampler lcm --steps 4 --guidance $g --num-images ${EVAL_N:-1000}; done) &
for name in k1-ddim k5-ddim k10-ddim k50-ddim k20-dpmsolver k20-dpmsolverpp; do
  ev "ablation-$name" "$RUN/lcd-$name" --sampler lcm --steps 1,2,4 --guidance 8 --num-images ${EVAL_N_ABL:-500} &
done
wait
grep -h "^| \(lcm\|ddim\|dpm\)" "$RUN"/eval-lcm/eval.md "$RUN"/eval-teacher/eval.md 2>/dev/null
fi
pack
log "done"
