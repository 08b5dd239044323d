#!/usr/bin/env bash
# The GPU measurements in one call on a fresh H100/H200 (random weights of the real shapes, a cold compiler cache).
#
# The call a person makes:
#   1. Where there is network, put the wheels the device lacks into .whl/ (ignored by git): bitsandbytes and
#      diffusers for the device's Python, e.g.
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#          --platform manylinux_2_24_x86_64 --platform any -d .whl bitsandbytes diffusers
#   2. One command on the device machine, carrying the .whl folder, with timeout_s 600 and the commit it runs
#      written out (the copy there has no .git):
#        GIT_SHA=<git rev-parse HEAD, run here> bash tests/gpu/run.sh
#   3. At once, while that machine is still warm (its compiler cache, wheels and train run stay in /tmp), the
#      stages the first call skipped, in the same order; this call's results then hold the first call's records too:
#        STAGES="<the skipped stages>" BUDGET=<seconds this call may take - 30> GIT_SHA=... bash tests/gpu/run.sh
#   4. Copy the last call's returned results.json and results.md into assets/gpu/.
#
# Stages, in this priority (STAGES sets the order, not only the filter; the plan line shows each one's cap):
#   compiled      bench.py, ours compiled, the default mode, batch 4 at 1024^2: the speed target, and on a fresh
#                 machine the cold compile of the default scope
#   24gb          the 24 GB mode (pure bf16 + per-block checkpointing, batch 1), eager: its target is memory
#   train_e2e     train.py at full size, synthetic 1024^2 images through the real latent/text cache, compiled;
#                 its graph is compiled's, so its compile reuses compiled's cache
#   diffusers_compiled   the same step on diffusers' UNet (after the forward check), compiled: the ratio target
#                 (collect.py pairs its record with compiled's; each side in its own process, under its own cap)
#   scope_blocks  bench.py with --compile_scope=blocks and a fresh compiler cache: the regional compile's cold
#                 first step and its steady step, next to compiled's
#   train_resume  one more step from train_e2e's ckpt.pt, eager: the state loads and steps
#   default_eager, sdpa_flash, sdpa_cudnn   eager, so each measures its own attention backend (the Inductor
#                 cache key ignores the SDPA backend flags: a compiled run would reuse another backend's graph)
#   scope_unet    as scope_blocks for the whole-UNet scope (compiled on a machine whose cache is not cold)
# Every stage runs under its own time limit (its cap, cut to what is left of BUDGET); a stage stopped at its
# limit keeps what it measured: bench.py appends each side's record as soon as it is measured, train.py writes
# its log as it goes and checkpoints on SIGTERM. tests/gpu/collect.py turns the logs and records into
# results.json and results.md after every stage, so a call cut short still returns its results.
#   bash tests/gpu/run.sh                         # results, logs and records in $OUT
#   GPU_RESULTS_REPO=. bash tests/gpu/run.sh      # also results.json and results.md in that repo's assets/gpu/
#   GPU_DRY_RUN=1 bash tests/gpu/run.sh           # every stage on CPU: tiny models, 2-4 steps (tests/test_gpu_script.py)
set -u
cd "$(dirname "$0")/../.."
T0=$SECONDS
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# seconds from start to results, setup and collector included: timeout_s 600 leaves the rest for the kill
# grace of a stage cut at its limit and for the return of $OUT
BUDGET=${BUDGET:-570}
SUMMARY=5   # kept back for the last collector run
GRACE=15    # SIGTERM at a stage's limit, SIGKILL this much later (train.py finishes its step and writes ckpt.pt)
# each stage's cap in seconds, sized from an H200 call (16 CPU cores): ours' whole-UNet cold compile had not reached
# its first step 330 s into a stage that built diffusers' UNet too, 32 s with the cache warm; train.py's compile
# after that 42 s and its stage 113 s in all; the 24 GB stage 46 s; an eager bench stage about 40 s. ckpt.pt at full
# size is ~16 GB and takes ~20 s to write.
declare -A CAP=([compiled]=330 [24gb]=65 [train_e2e]=135 [diffusers_compiled]=300 [train_resume]=100
                [default_eager]=60 [sdpa_flash]=60 [sdpa_cudnn]=60 [scope_blocks]=300 [scope_unet]=330)
TARGETS="compiled 24gb train_e2e"  # the plan must fit these three into the budget
STAGES=${STAGES:-"compiled 24gb train_e2e diffusers_compiled scope_blocks train_resume default_eager sdpa_flash sdpa_cudnn scope_unet"}
for s in $STAGES; do
  [ -n "${CAP[$s]:-}" ] || { echo "STAGES: unknown stage $s (known: ${!CAP[*]})"; exit 2; }
done

if [ -n "${GPU_DRY_RUN:-}" ]; then
  W=$(mktemp -d)
  KEEP=${GPU_KEEP:-}  # the dry run starts from nothing unless told
  # compiled by Dynamo alone (no codegen), per block: the quickest trace, and the scope stages' compile path
  # (distributed.compile_unet); tests/test_train.py traces the whole UNet
  TRAIN=(python3 train.py config/tiny.py --init_from="$W/start.safetensors" --tiny_size=True --resolution=128
         --bucket_step=32 --synthetic_sizes="((128, 128),)" --make_synthetic=6 --eval_items=2
         --batch_size=2 --compile=True --debug_compile_backend=eager --compile_mode=default --compile_scope=blocks)
  STEPS=3; LOG_EVERY=1
  BENCH=(python3 bench.py config/tiny.py --batch_size=2 --resolution=128 --warmup=0 --iters=1 --rounds=1 --compile=False)
  B4=(--batch_size=2)
  COMPILED=(--compile=False)  # the scope stages' plumbing only: train_e2e above traces the blocks scope
  NEED_GIB=0
else
  W=/tmp/gpu_work
  KEEP=${GPU_KEEP:-/tmp/gpu_keep}  # this machine's earlier calls: their records and train logs
  if [ -d .whl ]; then  # a machine without network: the carried wheels, installed once per machine
    if [ "$(ls .whl)" != "$(cat /tmp/site/.wheels 2>/dev/null)" ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        > "$OUT/pip.txt" 2>&1 && ls .whl > /tmp/site/.wheels || { echo "pip install of .whl/ failed:"; tail -n 5 "$OUT/pip.txt"; }
      rm -f "$OUT/pip.txt"
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  TRAIN=(python3 train.py --init_from=random --synthetic_sizes="((1024, 1024),)" --make_synthetic=16 --eval_items=2
         --batch_size=4 --compile=True)
  STEPS=25; LOG_EVERY=5  # 5 log lines: the first holds the first step, the other 4 are the steady state
  BENCH=(python3 bench.py --init_from=random --resolution=1024 --warmup=2 --iters=10 --rounds=1)
  B4=(--batch_size=4)
  COMPILED=(--compile=True)
  NEED_GIB=25  # a train stage's peak on disk: ckpt.pt (~16 GB, written beside the old one) + the export (~7 GB)
fi
TMP_ROOT=$(dirname "$W")  # where the train stages write

# fail fast: without bitsandbytes (AdamW8bit) or diffusers (the comparison) every stage would fail on its own,
# each after a minute of setup. One Python process checks the imports and writes the versions for run.txt.
python3 - > "$OUT/run.txt" 2>&1 <<'EOF'
import importlib, platform, sys
bad, have = [], {}
for m in ("torch", "bitsandbytes", "diffusers", "PIL", "regex", "safetensors", "numpy"):  # what train.py and bench.py import
    try:
        have[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception as e:  # a broken install raises more than ImportError
        bad.append(f"{m} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
if bad:
    print("MISSING python module " + "; ".join(bad) + ": no stage can run. Carry the .whl folder of bitsandbytes "
          "and diffusers wheels with the call (see the top of tests/gpu/run.sh)", flush=True)
    sys.exit(1)
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "bitsandbytes", have["bitsandbytes"], "diffusers", have["diffusers"])
EOF
if (($? != 0)); then
  tail -n 5 "$OUT/run.txt"
  exit 3
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  awk -v cpus="$(nproc)" '/^MemTotal/ {t = $2} /^MemAvailable/ {a = $2}
    END {printf "cpus %d, RAM %.0f GiB, %.0f GiB available\n", cpus, t / 1048576, a / 1048576}' /proc/meminfo
  df -h "$TMP_ROOT" . | awk 'NR == 1 || !seen[$0]++'
  cache=${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor_$(whoami)}
  echo "inductor cache $cache: $(find "$cache" -type f 2>/dev/null | wc -l) files"
} >> "$OUT/run.txt" 2>&1
cat "$OUT/run.txt"

# the earlier calls' measurements on this machine stay in the results; a stage run again replaces its own
KEPT="records.jsonl train.log resume.log run.json"
for f in $KEPT bench.log; do
  rm -f "$OUT/$f"
done
if [ -n "$KEEP" ]; then
  mkdir -p "$KEEP"
  for f in $KEPT; do
    [ -f "$KEEP/$f" ] && cp "$KEEP/$f" "$OUT/$f"
  done
  [[ " $STAGES " == *" train_e2e "* ]] && rm -f "$OUT/train.log" "$OUT/resume.log" "$OUT/run.json"
  [[ " $STAGES " == *" train_resume "* ]] && rm -f "$OUT/resume.log"
  [ -f "$OUT/records.jsonl" ] && echo "kept from this machine's earlier calls: $(grep -c . "$OUT/records.jsonl") records"
fi

DIRS=(--out_dir="$W/run" --dataset_dir="$W/data" --tokenizer="$W/tokenizer" --cache_dir="$W/cache"
      --eval_interval=0 --sample_interval=0 --ckpt_interval=0)
REC=(--record="$OUT/records.jsonl")
DRY_LIMIT=600  # seconds per stage in the dry run

left() { echo $((BUDGET - SUMMARY - (SECONDS - T0))); }
free_gib() { df -Pk "$1" 2>/dev/null | awk 'NR == 2 {print int($4 / 1048576)}'; }
collect() {  # results.json and results.md as they stand, in $OUT (and in the repo's assets/ when asked)
  python3 tests/gpu/collect.py "$OUT" --train_dir="$W/run" ${GPU_RESULTS_REPO:+--assets="$GPU_RESULTS_REPO/assets/gpu"} "$@"
  if [ -n "$KEEP" ]; then
    for f in $KEPT; do
      if [ -f "$OUT/$f" ]; then cp "$OUT/$f" "$KEEP/$f"; else rm -f "$KEEP/$f"; fi
    done
  fi
}
explain() {  # what an exit status means here
  case $1 in
    0) ;;
    124) echo " (stopped at its limit)" ;;
    137) echo " (killed: out of memory, or still running ${GRACE} s after its limit)" ;;
    2) echo " (a user error: the last log line says why)" ;;
    1) echo " (failed)" ;;
    *) (($1 > 128)) && echo " (got signal $(($1 - 128)))" || echo " (failed)" ;;
  esac
}
# the lines of a stage's log worth seeing at once: results, and every kind of failure
WORTH='^(iter [0-9]+:|compiled|first step|ready in|exported|resumed|ours: .*img/s|diffusers: .*img/s|equivalence|ratio|target|got signal|config error|cannot |no space|stopping|MISSING|WARNING)|Error|Traceback|Killed|No space left|out of memory|Segmentation fault|core dumped'

# stage NAME LOG COMMAND...: runs the command under `timeout` (its cap, cut to what is left of the budget), its
# output appended to LOG after a `$ command` line (collect.py reads it); skipped with too little time left.
# Prints one line with the exit status and the free disk, then the stage's result lines, or its last 15 log lines
# when it failed.
stage() {
  local name=$1 log=$2
  shift 2
  local limit=${CAP[$name]} have
  have=$(left)
  if ((have < 30)); then
    echo "stage $name: skipped, $have s of the budget left" | tee -a "$OUT/run.txt"
    return 1
  fi
  if [ -n "${GPU_DRY_RUN:-}" ]; then
    limit=$DRY_LIMIT  # not cut to the budget: CPU times say nothing about the GPU plan
  elif ((limit > have)); then
    limit=$have
  fi
  local start=$SECONDS seen rc
  seen=$(cat "$log" 2>/dev/null | wc -l)
  python3 -c 'import shlex, sys; print("$", shlex.join(sys.argv[1:]))' "$@" >> "$log"
  timeout -k $GRACE "$limit" "$@" >> "$log" 2>&1
  rc=$?
  echo "stage $name: exit $rc$(explain $rc) after $((SECONDS - start)) s (limit $limit s), $(free_gib "$TMP_ROOT") GiB free" \
    | tee -a "$OUT/run.txt"
  if ((rc == 0)); then
    tail -n +$((seen + 1)) "$log" | grep -E "$WORTH" | tail -n 6 | sed "s/^/  $name: /"
  else
    tail -n +$((seen + 1)) "$log" | tail -n 15 | sed "s/^/  $name| /"
  fi
  collect > /dev/null
  return $rc
}

# enough disk for a train stage, or a line saying why it is skipped
disk_for() {
  local free
  free=$(free_gib "$TMP_ROOT")
  ((free >= NEED_GIB)) && return 0
  echo "stage $1: skipped, $free GiB free in $TMP_ROOT, it needs $NEED_GIB GiB" | tee -a "$OUT/run.txt"
  return 1
}

run_stage() {
  local name=$1
  case $name in
    compiled)  # ours compiled, the default mode (fp32 master + bf16 autocast), batch 4
      stage compiled "$OUT/bench.log" "${BENCH[@]}" "${B4[@]}" "${REC[@]}" --record_as='("default_compiled", "")' ;;
    diffusers_compiled)  # the same step on diffusers' UNet (after the check that both forwards agree), compiled
      stage diffusers_compiled "$OUT/bench.log" "${BENCH[@]}" "${B4[@]}" --compare=diffusers --measure=diffusers \
        "${REC[@]}" --record_as='("", "diffusers_compiled")' ;;
    24gb)  # pure bf16 weights (stochastic rounding) + per-block checkpointing, batch 1; eager: its target is memory
      stage 24gb "$OUT/bench.log" "${BENCH[@]}" --batch_size=1 --precision=bf16 --grad_ckpt=True --compile=False \
        "${REC[@]}" --record_as='("24gb", "")' ;;
    train_e2e)  # a fresh run: what an earlier call left in $W goes first
      rm -rf "$W/run" "$W/cache" "$W/data" "$W/tokenizer"
      disk_for train_e2e || return
      stage train_e2e "$OUT/train.log" "${TRAIN[@]}" "${DIRS[@]}" --max_iters=$STEPS --log_interval=$LOG_EVERY
      [ -f "$W/run/run.json" ] && cp "$W/run/run.json" "$OUT/run.json" && collect > /dev/null ;;
    train_resume)  # the fewest steps that prove the state loads and steps: one, eager
      if [ ! -f "$W/run/ckpt.pt" ]; then
        echo "stage train_resume: skipped, no $W/run/ckpt.pt (train_e2e did not run on this machine)" | tee -a "$OUT/run.txt"
        return
      fi
      rm -rf "$W/run/model.safetensors" "$W/run/model_ema.safetensors" "$W/run/diffusers"  # the resume exports again
      disk_for train_resume || return
      local at
      at=$(grep -oE '^saved .* at iter [0-9]+' "$OUT/train.log" 2>/dev/null | tail -n 1 | grep -oE '[0-9]+$')
      stage train_resume "$OUT/resume.log" "${TRAIN[@]}" "${DIRS[@]}" --init_from=resume --max_iters=$((${at:-$STEPS} + 1)) \
        --log_interval=1 --compile=False \
        && rm -f "$W/run/ckpt.pt" ;;  # nothing later needs it (a second resume to the same step is refused)
    default_eager)
      stage default_eager "$OUT/bench.log" "${BENCH[@]}" "${B4[@]}" --compile=False "${REC[@]}" \
        --record_as='("default_eager", "")' ;;
    sdpa_flash | sdpa_cudnn)
      stage "$name" "$OUT/bench.log" "${BENCH[@]}" "${B4[@]}" --compile=False --sdpa="${name#sdpa_}" "${REC[@]}" \
        --record_as="(\"$name\", \"\")" ;;
    scope_blocks | scope_unet)  # cold: a compiler cache of its own, removed after
      local cold="$W/inductor_$name"
      rm -rf "$cold"
      stage "$name" "$OUT/bench.log" env TORCHINDUCTOR_CACHE_DIR="$cold" TRITON_CACHE_DIR="$cold/triton" \
        "${BENCH[@]}" "${B4[@]}" "${COMPILED[@]}" --compile_scope="${name#scope_}" "${REC[@]}" \
        --record_as="(\"$name\", \"\")"
      rm -rf "$cold" ;;
  esac
}

plan="" fit=0
for s in $STAGES; do
  plan+=" $s=${CAP[$s]}"
  [[ " $TARGETS " == *" $s "* ]] && fit=$((fit + CAP[$s]))
done
echo "plan:$plan"
echo "budget: $(left) s for the stages (BUDGET=$BUDGET, setup took $((SECONDS - T0)) s, $SUMMARY s kept for the results)"
(($(left) < fit)) && echo "plan: the target stages ($TARGETS) need $fit s, more than the budget: the last of them will be cut"
for s in $STAGES; do
  run_stage "$s"
done

collect
echo "total $((SECONDS - T0)) s" | tee -a "$OUT/run.txt"
