#!/usr/bin/env bash
# The GPU measurements in one call on an H100/H200 (random weights of the real shapes). bitsandbytes and diffusers
# must be importable (a machine without network installs them from wheels first). Every stage has its own time
# limit so one slow compile cannot eat the others; logs go to $OUT.
#   STAGES="parity eager compiled 24gb train" bash tests/gpu/run.sh
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
STAGES=${STAGES:-"parity eager compiled 24gb train"}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"
F='^(device|UNet|equivalence|ours|diffusers|target|ratio)'
B="python3 bench.py --init_from=random --resolution=1024"
has() { [[ " $STAGES " == *" $1 "* ]]; }
# model parity at 1024x1024 (fp32 and bf16) + eager forward/backward cost at batch 1 and 4
has parity && timeout 100 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/parity.log" | grep -E '^\||passed|failed|Error'
# the UNet training step alone, ours vs diffusers, both eager (the same compile setting), batch 4, AdamW8bit
has eager && timeout 200 $B --batch_size=4 --compare=diffusers --compile=False --warmup=2 --iters=5 --rounds=2 2>&1 | tee "$OUT/bench_eager.log" | grep -E "$F"
# both compiled (ours fullgraph), the default mode: fp32 master + bf16 autocast, channels_last, batch 4
has compiled && timeout 480 $B --batch_size=4 --compare=diffusers --warmup=2 --iters=10 --rounds=2 2>&1 | tee "$OUT/bench_compiled.log" | grep -E "$F"
# attention backends on ours, compiled (the Inductor cache of the stage above makes these compiles short)
for b in flash cudnn; do has sdpa && timeout 150 $B --batch_size=4 --sdpa=$b --warmup=2 --iters=10 --rounds=1 2>&1 | tee "$OUT/bench_sdpa_$b.log" | grep -E "$F"; done
# the 24 GB mode: pure bf16 weights (stochastic rounding) + per-block checkpointing, batch 1, eager
has 24gb && timeout 120 $B --batch_size=1 --precision=bf16 --grad_ckpt=True --compile=False --warmup=2 --iters=5 --rounds=1 2>&1 | tee "$OUT/bench_24gb.log" | grep -E "$F"
# train.py end to end: random full-size SDXL, cached synthetic 1024^2 latents, batch 4, AdamW8bit, compile
has train && timeout 300 python3 train.py --init_from=random --out_dir=/tmp/gpurun --dataset_dir=/tmp/gpudata \
  --tokenizer=/tmp/gputok --make_synthetic=16 --synthetic_sizes="((1024, 1024),)" --eval_items=2 --max_iters=30 \
  --log_interval=5 --eval_interval=0 --sample_interval=0 --ckpt_interval=0 2>&1 | tee "$OUT/train.log" \
  | grep -E '^(iter|first|global|skipped|saved|Traceback|\w+Error)'
true
