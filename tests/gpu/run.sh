#!/usr/bin/env bash
# The GPU measurements in one call on a fresh H100/H200 (random weights of the real shapes, a cold compiler cache),
# most important first, all inside BUDGET seconds (9 minutes): every stage has its own time limit, cut to what is
# left of the budget, and a stage stopped at its limit keeps what it measured (train.py writes its log as it goes
# and checkpoints on SIGTERM; bench.py writes its records on SIGTERM). tests/gpu/collect.py then turns the logs and
# records into results.json and results.md and prints the targets as met / missed.
#   bash tests/gpu/run.sh                        # results, logs and records in $OUT
#   GPU_RESULTS_REPO=. bash tests/gpu/run.sh     # also results.json and results.md in that repo's assets/gpu/
#   GPU_DRY_RUN=1 bash tests/gpu/run.sh          # every stage on CPU: tiny models, 2-3 steps (tests/test_gpu_script.py)
#   STAGES="compiled 24gb" bash tests/gpu/run.sh # only these stages (names below); BUDGET=seconds changes the total
#   GIT_SHA=$(git rev-parse HEAD) ...            # the commit to record where the copy that runs has no .git
# Stages, in this order: (a) train_e2e: train.py at full size, synthetic 1024^2 images through the real latent/text
# cache, the demo's tokenizer folder, compiled, batch 4, 35 steps; train_resume: 2 more steps from its ckpt.pt (the
# export runs at the end of both); (b) compiled: bench.py ours vs diffusers in one call (records default_compiled and
# diffusers_compiled); (c) 24gb: pure bf16 + per-block checkpointing, batch 1; (d) default_eager, sdpa_flash,
# sdpa_cudnn.
# bitsandbytes and diffusers must be importable; a machine without network installs them from a wheel folder
# carried along (.whl/).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
BUDGET=${BUDGET:-540}  # seconds for every stage together
STAGES=${STAGES:-"train_e2e train_resume compiled 24gb default_eager sdpa_flash sdpa_cudnn"}
SUMMARY=30  # seconds kept back for the collector
export PYTHONUNBUFFERED=1
T0=$SECONDS

if [ -n "${GPU_DRY_RUN:-}" ]; then
  W=$(mktemp -d)
  TRAIN=(python3 train.py config/tiny.py --init_from="$W/start.safetensors" --tiny_size=True --resolution=128
         --bucket_step=32 --synthetic_sizes="((128, 128), (96, 160))" --make_synthetic=6 --eval_items=2
         --batch_size=2 --compile=True --debug_compile_backend=eager --compile_mode=default)
  STEPS=3; LOG_EVERY=1
  BENCH=(python3 bench.py config/tiny.py --batch_size=2 --resolution=128 --warmup=0 --iters=1 --rounds=1 --compile=False)
  B4=(--batch_size=2); ROUNDS=(--rounds=1)
else
  W=/tmp/gpu_work
  [[ " $STAGES " == *" train_e2e "* ]] && rm -rf "$W"  # a fresh run; train_resume alone continues the last one
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site
  fi
  TRAIN=(python3 train.py --init_from=random --synthetic_sizes="((1024, 1024),)" --make_synthetic=24 --eval_items=2
         --batch_size=4 --compile=True)
  STEPS=35; LOG_EVERY=5
  BENCH=(python3 bench.py --init_from=random --resolution=1024 --warmup=2 --iters=10)
  B4=(--batch_size=4); ROUNDS=(--rounds=2)
fi
DIRS=(--out_dir="$W/run" --dataset_dir="$W/data" --tokenizer="$W/tokenizer" --cache_dir="$W/cache"
      --eval_interval=0 --sample_interval=0 --ckpt_interval=0)
REC=(--record="$OUT/records.jsonl")
rm -f "$OUT/records.jsonl" "$OUT/train.log" "$OUT/resume.log" "$OUT/bench.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  for m in bitsandbytes diffusers PIL regex safetensors numpy; do  # what train.py and bench.py import
    python3 -c "import $m" 2>/dev/null || echo "MISSING python module $m: stages that import it will fail"
  done
} > "$OUT/run.txt" 2>&1

# stage NAME MAX_SECONDS LOG COMMAND...: runs the command under `timeout` (SIGTERM at the limit, SIGKILL 20 s
# later), its output appended to LOG after a `$ command` line (collect.py reads it); skipped when under 20 s of the
# budget are left; prints the stage's last result lines
stage() {
  local name=$1 max=$2 log=$3
  shift 3
  [[ " $STAGES " == *" $name "* ]] || return 0
  local limit=$((BUDGET - SUMMARY - (SECONDS - T0)))
  ((limit > max)) && limit=$max
  if ((limit < 20)); then
    echo "stage $name: skipped, $limit s of the budget left" | tee -a "$OUT/run.txt"
    return
  fi
  local start=$SECONDS seen
  seen=$(cat "$log" 2>/dev/null | wc -l)
  python3 -c 'import shlex, sys; print("$", shlex.join(sys.argv[1:]))' "$@" >> "$log"
  timeout -k 20 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "stage $name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/run.txt"
  tail -n +$((seen + 1)) "$log" | grep -E '^(iter|compiled|first step|exported|ours|diffusers|equivalence|ratio|target)|Error' \
    | tail -n 4 | sed "s/^/  $name: /"
}

# (a) train.py end to end, then a resume from its ckpt.pt (eager: it checks the state, not the speed)
stage train_e2e 300 "$OUT/train.log" "${TRAIN[@]}" "${DIRS[@]}" --max_iters=$STEPS --log_interval=$LOG_EVERY
stage train_resume 120 "$OUT/resume.log" "${TRAIN[@]}" "${DIRS[@]}" --init_from=resume --max_iters=$((STEPS + 2)) \
  --log_interval=1 --compile=False
# (b) ours vs diffusers, both compiled, the default mode (fp32 master + bf16 autocast), batch 4
stage compiled 240 "$OUT/bench.log" "${BENCH[@]}" "${B4[@]}" "${ROUNDS[@]}" --compare=diffusers "${REC[@]}" \
  --record_as='("default_compiled", "diffusers_compiled")'
# (c) the 24 GB mode: pure bf16 weights (stochastic rounding) + per-block checkpointing, batch 1
stage 24gb 180 "$OUT/bench.log" "${BENCH[@]}" --batch_size=1 --precision=bf16 --grad_ckpt=True --rounds=1 "${REC[@]}" \
  --record_as='("24gb", "")'
# (d) if time is left: eager, and the attention backends pinned (compiles hit the Inductor cache of (b))
stage default_eager 90 "$OUT/bench.log" "${BENCH[@]}" "${B4[@]}" --rounds=1 --compile=False "${REC[@]}" \
  --record_as='("default_eager", "")'
for b in flash cudnn; do
  stage sdpa_$b 90 "$OUT/bench.log" "${BENCH[@]}" "${B4[@]}" --rounds=1 --sdpa=$b "${REC[@]}" \
    --record_as="(\"sdpa_$b\", \"\")"
done

python3 tests/gpu/collect.py "$OUT" --train_dir="$W/run" ${GPU_RESULTS_REPO:+--assets="$GPU_RESULTS_REPO/assets/gpu"}
echo "total $((SECONDS - T0)) s" | tee -a "$OUT/run.txt"
