"""
Uptrain SDXL from epsilon- to v-prediction on a new noise schedule, nanoGPT style.

The recipe (docs/maths.md §1): v = alpha eps - sigma x, per-sample MSE weighted by sigmoid(k - logSNR_t) with
k = 5, on scaled-linear betas 0.00085 -> 0.024 rescaled to zero terminal SNR (Lin et al. 2023), AdamW8bit with
lr < 1e-5 and betas ramped (0.9, 0.95) -> (0.95, 0.99), bf16 compute with fp32 master weights, compiled UNet.
The VAE and text encoders are frozen; their outputs are cached once (cache.py).

Launch:
    python train.py config/tiny.py                                   # offline CPU demo, tiny model
    python train.py config/vpred.py --k=5 --dataset_dir=/path/imgs   # 1 GPU, the real SDXL recipe
    torchrun --standalone --nproc_per_node=8 train.py config/vpred.py --dataset_dir=...   # DDP
    torchrun --standalone --nproc_per_node=8 train.py config/vpred.py --parallel=fsdp ...  # sharded (sharding.py)
    python train.py config/tiny.py --init_from=resume                # continue out_dir's ckpt.pt exactly
    python train.py --help                                           # every key, default and meaning
"""
import math
import os
import platform
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

import cache
import checkpoint
import configurator
import data
import demo
import distributed
import export
import files
import model
import objective
import optim
import perf
import preflight
import runlog
import runstate
import sample_ablation
import schedule
import tokenizer as clip_tokenizer

_t_launch = time.time()  # the `ready in` line counts from here (a leading _: not a config key)

# -----------------------------------------------------------------------------
# I/O
out_dir = "out/vpred"  # ckpt.pt, model.safetensors, diffusers/, logs, previews
init_from = "hf:stabilityai/stable-diffusion-xl-base-1.0/sd_xl_base_1.0_0.9vae.safetensors"  # local file | hf:REPO/FILE | 'random' (SDXL-shaped) | 'resume'
tokenizer = "hf:stabilityai/stable-diffusion-xl-base-1.0"  # folder with vocab.json + merges.txt, or hf:REPO
tiny_size = False  # init_from missing -> make a tiny random SDXL-topology checkpoint there (offline demo)
ckpt_interval = 250  # iterations between ckpt.pt writes (also written at the end and on SIGINT/SIGTERM)
overwrite = False  # a fresh run may replace the ckpt.pt and model.safetensors in out_dir (otherwise it refuses)
export_dtype = "fp16"  # dtype of the exported model.safetensors: fp16 | bf16 | fp32
# data
dataset_dir = ""  # images + same-stem .txt captions, or metadata.jsonl (file_name, text)
cache_dir = ""  # latents/text-embedding cache; '' -> out_dir/cache (never beside the images)
make_synthetic = 0  # >0: dataset_dir missing -> write this many synthetic captioned images there (and a vocabulary learned from their captions if `tokenizer` is a missing folder)
synthetic_sizes = ((1024, 1024), (832, 1216), (1216, 832))  # (h, w) of the synthetic images
resolution = 1024  # bucket area = resolution^2
bucket_step = 64  # bucket sides are multiples of this
crop = "center"  # center | random (random is drawn once per image, so the cache stays valid)
flip = False  # horizontal flip, drawn once per image
min_pixels = 0  # images with fewer pixels are skipped; bigger ones smaller than their bucket are upscaled (as kohya does); 0 = a quarter of the smallest bucket
caption_dropout = 0.1  # fraction of samples trained unconditionally (zeroed context and pooled)
eval_items = 4  # images held out for the per-t-bin eval (taken from the dataset, never trained on)
max_token_length = 75  # 75 | 150 | 225 caption tokens: 1 | 2 | 3 chunks of 77 positions, as the UIs sample (docs/sdxl_format.md §8)
cache_dtype = "fp32"  # fp32 | bf16 | fp16: the cached latents and text embeddings (bf16/fp16 halve the disk)
# the recipe
batch_size = 4  # per-process micro-batch; global batch = batch_size * grad_accum (or * processes when grad_accum is 1)
grad_accum = 1  # micro-steps per optimizer step, over all processes (each does grad_accum / processes); 1 = one each
max_iters = 1000  # optimizer steps
prediction = "v"  # v | eps (eps pretrains an epsilon model with the same loop)
beta_start = 0.00085  # scaled-linear betas start
beta_end = 0.024  # 0.012 * sqrt(1024 / 256): the recipe's resolution-scaled schedule
zsnr = True  # rescale to zero terminal SNR (Lin et al. Alg. 1)
weighting = "sigmoid"  # sigmoid | kg_sigmoid | min_snr | none (docs/maths.md §4)
k = 5.0  # sigmoid weighting offset: m(t) = sigmoid(k - logSNR_t)
gamma = 5.0  # min_snr gamma
# optimizer
optimizer = "adamw8bit"  # adamw8bit (bitsandbytes) | adamw (torch, fused on CUDA) | adafactor (torch)
lr = 7.5e-6  # peak learning rate; the recipe needs < 1e-5
min_lr = 7.5e-7  # floor of the cosine schedule
lr_schedule = "constant"  # constant | cosine (after warmup)
warmup_iters = 0  # linear warmup steps
ramp_iters = 1000  # steps over which betas ramp and the cosine decays (a key of its own so a stopped and resumed run is the same run)
beta1 = 0.9  # Adam beta1 at step 0
beta2 = 0.95  # Adam beta2 at step 0
beta1_final = 0.95  # beta1 after ramp_iters
beta2_final = 0.99  # beta2 after ramp_iters
weight_decay = 0.01  # decoupled, on >= 2-D weights only
adam_eps = 1e-8  # Adam epsilon
grad_clip = 1.0  # clip the global grad norm; 0 = off
max_skips = 10  # this many non-finite steps in a row stop the run
ema_decay = 0.0  # exponential moving average of the UNet weights, exported as model_ema.safetensors; 0 = off
ema_interval = 1  # successful optimizer steps between EMA updates
ema_device = "cpu"  # cpu | cuda (the training device): where the fp32 EMA lives
ema_eval = False  # the held-out eval and the previews use the EMA weights
# system
parallel = "ddp"  # under torchrun: ddp = a whole UNet per process | fsdp = weights, grads, optimizer state sharded
device = "cuda" if torch.cuda.is_available() else "cpu"  # cuda | cpu | cuda:N
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # compute dtype (autocast)
precision = "amp"  # amp: fp32 master weights + autocast; bf16: pure bf16 weights, updates kept by stochastic rounding (adamw8bit)
compile = torch.cuda.is_available()  # torch.compile the UNet (the uncompiled module is what gets saved)
compile_warm = True  # compile every training bucket before step 1 (cost printed); False: at each bucket's first batch
compile_mode = "default"  # torch.compile mode: default | max-autotune-no-cudagraphs | reduce-overhead | max-autotune
compile_scope = "unet"  # unet: the whole UNet, one graph per bucket | blocks: each ResBlock/TransformerBlock on its own, instances sharing traced code (docs/performance.md §6)
grad_ckpt = False  # per-block gradient checkpointing (+31% FLOPs; for small-memory cards)
seed = 1337  # seeds the data order, caption dropout, t and noise (the same on every process)
peak_tflops = 0.0  # device peak for MFU; 0 = look up the device table
# logging
log_interval = 10  # iterations per printed line
eval_interval = 100  # iterations between held-out per-t-bin MSE evals (0 = off)
sample_interval = 0  # iterations between preview grids (0 = off)
sample_prompts = ("a photo of a cat", "a red circle on a blue background")  # preview prompts
sample_steps = 25  # DDIM steps for previews (trailing spacing)
guidance = 5.0  # CFG scale for previews
cfg_phi = 0.7  # CFG rescale for previews (Lin et al. §3.4)
wandb_log = False  # log to wandb (lazy import, master process only)
wandb_project = "sdxl-vpred"  # wandb project
wandb_run_name = "vpred"  # wandb run name
tensorboard_log = False  # loss, lr, img/s, per-t-bin MSE, the held-out eval and previews to out_dir/tensorboard/
# debugging and tests, not training settings
debug_compile_backend = "inductor"  # torch.compile backend; the tests use Dynamo's 'eager' (tracing, no codegen)
debug_nan_at = -1  # make the loss NaN from this iteration on, to exercise the skip path
# -----------------------------------------------------------------------------
config = configurator.configure(globals())
saved = runstate.adopt(config, _given, out_dir) if init_from == "resume" else None  # the saved run's identity
globals().update(config)
preflight.check_config(config, world=int(os.environ.get("WORLD_SIZE", 1)))
preflight.check_paths(config)

# -----------------------------------------------------------------------------
# the recipe: the training schedule, lr and Adam betas over the run, the loss, one optimizer step

abar = schedule.alphas_cumprod(beta_end, zsnr, beta_start)  # float64 (T,); abar[-1] = 0 exactly under zsnr
T = len(abar)


def get_lr(step):
    """Linear warmup, then constant or cosine down to min_lr at ramp_iters (a pure function of the step)."""
    if step < warmup_iters:
        return lr * (step + 1) / (warmup_iters + 1)
    if lr_schedule == "constant":
        return lr
    ratio = min(1.0, (step - warmup_iters) / max(1, ramp_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def get_betas(step):
    """Adam betas ramped linearly (beta1, beta2) -> (beta1_final, beta2_final) over ramp_iters."""
    r = min(1.0, step / max(1, ramp_iters))
    return (beta1 + r * (beta1_final - beta1), beta2 + r * (beta2_final - beta2))


def train_step(step, log):
    """micro_steps forward/backward passes of the objective (objective.py), the global clip, the skip test, the
    update. Returns (mean loss, grad norm, taken, the loader state after the last batch)."""
    lr_now, betas_now = get_lr(step), get_betas(step)
    for group in opt.param_groups:
        group["lr"] = lr_now
        if "betas" in group:
            group["betas"] = betas_now
    loss_sum = torch.zeros((), device=device)
    for micro in range(micro_steps):
        batch, loader_state = next(batches)
        batch = to_device(batch)
        b = batch["latents"].shape[0]
        # t and noise are drawn for the whole global batch from an RNG seeded alike on every process, and each
        # process takes its slice: N processes then compute exactly the single-process update
        my_slice = slice(procs.rank * b, (procs.rank + 1) * b)
        t = torch.randint(0, T, (b * procs.world,))[my_slice].to(device)
        noise = torch.randn(b * procs.world, *batch["latents"].shape[1:])[my_slice].to(device)
        procs.grad_sync(train_unet, micro == micro_steps - 1)  # reduce gradients on the last micro-step only
        loss, mse = loss_fn(train_unet, batch, t, noise)
        if 0 <= debug_nan_at <= step:
            loss = loss * float("nan")
        (loss / micro_steps).backward()
        loss_sum += loss.detach() / micro_steps
        log.add_batch(t, mse.detach(), tuple(batch["latents"].shape[-2:]))
    # a non-finite loss or gradient skips the step: weights and optimizer state untouched. AdamW8bit applies the
    # clip factor as its kernels read the grads (no pass over them to scale); the others are clipped in place
    gnorm, coef = optim.clip_factor(opt, unet.parameters(), grad_clip if grad_clip > 0 else math.inf)
    ok = procs.all_ok(torch.isfinite(gnorm) & torch.isfinite(loss_sum))  # every process takes the same decision
    # the one host sync of the step, the skip decision and the clip factor in one transfer: bitsandbytes has no
    # on-device skip and takes the factor as a float, and a skipped step must not touch the optimizer state
    ok, coef = torch.stack([ok.float(), coef.float()]).tolist()
    if ok:
        opt.step(gnorm_scale=coef) if isinstance(opt, optim.FlatAdamW8bit) else opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, gnorm, bool(ok), loader_state


# -----------------------------------------------------------------------------
# processes and signals

procs = distributed.Procs(device, parallel)  # one process, or one per GPU under torchrun (distributed.py)
device = procs.device
micro_steps = max(1, grad_accum // procs.world)  # per process: grad_accum counts micro-batches over all of them
imgs_per_iter = batch_size * micro_steps * procs.world
device_type = "cuda" if device.startswith("cuda") else "cpu"
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # few shapes (one per bucket): let cuDNN time its conv algorithms

signals = distributed.Signals()  # SIGINT/SIGTERM/SIGHUP: stop now, or after the step with the resume state

# -----------------------------------------------------------------------------
# the resume state and the start checkpoint: the frozen VAE and text encoders always come from the start
# checkpoint, the UNet too unless resuming

resuming = init_from == "resume"
state_path = runstate.ckpt_path(out_dir, procs.sharded)
export_only = resuming and runstate.check(saved, state_path, config, procs.world, imgs_per_iter)  # before the cache
base, iter_num, skipped = (saved["base"], saved["iter_num"], saved["skipped"]) if resuming else (init_from, 0, 0)

t_load = time.time()
start_path = None if base == "random" else checkpoint.fetch(base)
if tiny_size and start_path and not os.path.exists(start_path):
    if procs.master:
        demo.make_tiny_start(start_path)
    procs.wait()
try:
    model_cfg = model.SDXLConfig() if base == "random" else checkpoint.read_config(start_path)
except checkpoint.CheckpointError as e:
    raise configurator.UserError(f"cannot load {start_path}: {e}") from None
preflight.check_buckets(model_cfg, config)
run_lock = files.lock(out_dir) if procs.master else None  # one run per out_dir, released when this process ends
cache_dir = cache_dir or os.path.join(out_dir, "cache")
files.make_dir(cache_dir, "cache_dir")
if procs.master:  # --overwrite=True: what the old run made goes; so do temp files a killed run left
    preflight.clean_run_folder(out_dir, cache_dir, fresh=overwrite and not resuming)
    print(f"global batch {imgs_per_iter} = {batch_size} micro x {micro_steps} accum x {procs.world} procs")
load_s = time.time() - t_load

# -----------------------------------------------------------------------------
# data: scan, hold out the eval items, cache latents and text embeddings once, then a resumable loader

t_data = time.time()
if make_synthetic and procs.master:
    if not os.path.isdir(dataset_dir):
        demo.make_synthetic_dataset(dataset_dir, n=make_synthetic, seed=0, sizes=synthetic_sizes)
    if not tokenizer.startswith("hf:") and not os.path.exists(os.path.join(tokenizer, "vocab.json")):
        # the synthetic demo's vocabulary is learned from its own captions, so it works offline
        demo.build_tiny_vocab(tokenizer, [item.caption for item in data.scan_dataset(dataset_dir, quiet=True)])
procs.wait()
tok = clip_tokenizer.load_tokenizer(tokenizer)
buckets = data.make_buckets(area=resolution * resolution, step=bucket_step)
items = data.scan_dataset(dataset_dir, buckets=buckets, seed=seed, crop=crop, flip=flip,
                          min_pixels=min_pixels or None)
if not items:
    raise configurator.UserError(f"{dataset_dir}: no usable images (see the lines above); add .png, .jpg, .jpeg "
                                 f"or .webp files")
if len(items) <= eval_items:
    raise configurator.UserError(f"{dataset_dir}: {len(items)} usable images, but {eval_items} are held out for the "
                                 f"eval (eval_items): add images or lower --eval_items")
eval_set, train_set = data.split_eval(items, eval_items, quiet=not procs.master)
cache.check_dir(cache_dir, items)  # before the model is loaded
data_s = time.time() - t_data

t_load = time.time()
if base == "random":  # SDXL-shaped random weights, for benchmarks: same weights in every process
    with torch.device(device):  # built and randomised in place: 3.5B parameters are slow to fill on a CPU
        sdxl = model.SDXL()
    model.init_random_(sdxl, seed=seed)
else:
    sdxl = checkpoint.load_checkpoint(start_path, device=device, dtype=torch.float32)
if resuming:
    runstate.load_weights(saved, sdxl.unet)
sdxl.requires_grad_(False)
unet = sdxl.unet  # the module that is saved and evaluated; train_unet (below) is what the loop calls
unet.requires_grad_(True)
unet.train()
unet.grad_ckpt = grad_ckpt
if precision == "bf16":  # halves weight and grad memory; AdamW8bit then writes back with stochastic rounding
    if optimizer != "adamw8bit":
        print(f"WARNING: pure bf16 weights with {optimizer} round each update to nearest: at lr < 1e-5 most "
              "updates are lost (docs/maths.md §7); adamw8bit keeps them with stochastic rounding")
    unet.to(torch.bfloat16)
load_s += time.time() - t_load

t_cache = time.time()
cached = cache.build_cache(items, sdxl, tok, cache_dir, device=device, rank=procs.rank, world=procs.world,
                           group=procs.slow_group, max_token_length=max_token_length,
                           dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cache_dtype])
loader = data.Loader(train_set, cached, batch_size=batch_size, rank=procs.rank, world=procs.world,
                     seed=seed, caption_dropout=caption_dropout)  # rank 0 prints the bucket histogram
# after caching, the text encoders are needed only for the preview prompts: encode those, then move the
# encoders off the GPU (the VAE stays, to decode previews)
preview_text = None
if sample_interval and procs.joins_forward:
    preview_text = sample_ablation.encode_prompts(sdxl, tok, list(sample_prompts), device, max_token_length)
sdxl.te1.to("cpu")
sdxl.te2.to("cpu")
cache_s = time.time() - t_cache + data_s

# -----------------------------------------------------------------------------
# the objective, the optimizer, the EMA, and the UNet prepared for the loop (compiled, DDP or FSDP)

loss_fn = objective.Objective(abar.to(device), prediction, weighting, k, gamma, autocast,
                              channels_last=device_type == "cuda")
train_buckets = sorted({item.bucket for item in train_set})
compile_kwargs = dict(fullgraph=True, backend=debug_compile_backend, mode=compile_mode) if compile else None
gather_dtype = ptdtype if precision == "amp" and ptdtype != torch.float32 else None  # fsdp's all-gathers
procs.prepare(unet, gather_dtype, compile_kwargs, compile_scope, len(train_buckets))
opt = optim.configure_optimizer(unet.parameters(), optimizer, lr, get_betas(0), adam_eps, weight_decay,
                                fused=device_type == "cuda", seed=seed)
ema = optim.EMA(unet.named_parameters(), ema_decay, device if ema_device == "cuda" else "cpu") if ema_decay else None
if resuming:
    runstate.restore(saved, state_path, procs, unet, opt, ema, optimizer)
train_unet = procs.wrap(unet, compile_kwargs, compile_scope, len(train_buckets))


def to_device(batch):
    return {key: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for key, v in batch.items()}


def evaluate():
    """Held-out target-MSE per t-bin on fixed items with fixed noise (docs/maths.md §6), one batch per bucket."""
    by_bucket = {}  # latents of different sizes cannot be stacked
    for item in eval_set:
        by_bucket.setdefault(item.bucket, []).append(item)
    unet.eval()
    bins = loss_fn.eval_bins(unet, [to_device(data.collate(group, cached)) for group in by_bucket.values()])
    unet.train()
    return bins


def preview(step):
    unet.eval()
    path = os.path.join(out_dir, "samples", f"iter_{step:06d}.png") if procs.master else None
    log.images(step, sample_ablation.preview(sdxl, *preview_text, abar, resolution, seed, sample_steps, prediction,
                                             guidance, cfg_phi, path))
    unet.train()


def save_state(step, loader_state):
    runstate.save(state_path, procs, unet, opt, ema, {"iter_num": step, "base": base, "skipped": skipped,
                                                      "config": config, "global_batch": imgs_per_iter}, loader_state)


# seed here, after every setup step (making a start checkpoint draws from the RNG, loading one does not); the
# same seed on every process, see the noise draw in train_step
random.seed(seed)
np.random.seed(seed)
torch.manual_seed(seed)
if resuming:
    state = runstate.rank_state(saved, procs)
    loader.load_state_dict(state["loader"])
    runstate.set_rng_state(state["rng"], device)
    print(f"resumed from {state_path} at iter {iter_num}")
    del saved, state
batches = data.prefetch(loader, pin_memory=device_type == "cuda")

# -----------------------------------------------------------------------------
# compile before step 1, run.json, the per-line stats

compile_s = 0.0
if compile and compile_warm and not export_only:
    # pay every bucket's compile (and cuDNN autotune) now, where it is timed, not inside the run: one
    # forward+backward per bucket at t = 0 with zero noise (no random numbers drawn, so resume stays exact);
    # the grads are zeroed, the optimizer never sees them
    t_compile = time.time()
    procs.grad_sync(train_unet, procs.sharded)  # no all-reduce for these (but FSDP would keep unsynced grads)
    for bucket in train_buckets:
        t_bucket = time.time()
        group = [item for item in train_set if item.bucket == bucket]
        batch = to_device(data.collate((group * batch_size)[:batch_size], cached))
        zeros = torch.zeros(batch_size, dtype=torch.long, device=device)
        loss_fn(train_unet, batch, zeros, torch.zeros_like(batch["latents"]))[0].backward()
        if device_type == "cuda":
            torch.cuda.synchronize()
        if procs.master:
            print(f"compiled bucket {bucket[0]}x{bucket[1]}: {time.time() - t_bucket:.1f} s")
    opt.zero_grad(set_to_none=True)
    compile_s = time.time() - t_compile
    if procs.master:
        print(f"compiled {len(train_buckets)} buckets in {compile_s:.1f} s")

ready = {"load_s": load_s, "cache_s": cache_s, "compile_s": compile_s}
ready["other_s"] = max(0.0, time.time() - _t_launch - sum(ready.values()))
ready["ready_s"] = time.time() - _t_launch
peak = peak_tflops or (perf.peak_tflops(torch.cuda.get_device_name(device)) if device_type == "cuda" else 0.0)
if procs.master:
    print(f"ready in {ready['ready_s']:.1f} s: load {load_s:.1f} s, cache {cache_s:.1f} s, compile {compile_s:.1f} s, "
          f"other {ready['other_s']:.1f} s")
    files.write_json(os.path.join(out_dir, "run.json"), {
        "git_sha": perf.git_sha(), "argv": sys.argv, "python": platform.python_version(), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device_type == "cuda" else platform.processor() or "cpu",
        "world_size": procs.world, "ready": {key: round(v, 2) for key, v in ready.items()}, "config": config},
        indent=1, default=str)
# -----------------------------------------------------------------------------
# the training loop

log = runlog.RunLog(procs, sdxl.cfg.unet, T, peak, max_iters, log_interval, out_dir,
                    context_len=clip_tokenizer.context_positions(max_token_length),
                    wandb_run=wandb_log and (wandb_project, wandb_run_name, config), tensorboard=tensorboard_log)
consecutive, steps_ok = 0, 0  # non-finite steps in a row; optimizer steps this process made
first_iter = iter_num
signals.training = True  # a signal from here on waits for the step to end and writes the resume state
t_first = time.time()
while iter_num < max_iters:
    loss_sum, gnorm, ok, loader_state = train_step(iter_num, log)
    if ok:
        consecutive, steps_ok = 0, steps_ok + 1
        log.add_step(loss_sum)
        if ema and (iter_num + 1 - skipped) % ema_interval == 0:  # every ema_interval successful steps
            ema.update()
    else:
        skipped, consecutive = skipped + 1, consecutive + 1
        print(f"iter {iter_num}: non-finite loss/grad (loss {loss_sum.item():.4g}, grad norm {gnorm.item():.4g}), "
              "step skipped")
    iter_num += 1
    if iter_num == first_iter + 1 and procs.master:  # on CUDA this step compiled the UNet: report it apart
        print(f"first step (compile, cuDNN autotune) {time.time() - t_first:.1f} s")
    if consecutive >= max_skips:
        save_state(iter_num, loader_state)
        sys.exit(f"stopping: {consecutive} non-finite steps in a row (lower lr? check the data); ckpt.pt written")

    if (ckpt_interval and iter_num % ckpt_interval == 0) or iter_num == max_iters or signals.received:
        with log.paused():  # (checkpoints, evals and previews are left out of img/s)
            save_state(iter_num, loader_state)  # before the eval and previews: a failure there never costs it
    if signals.received:
        break
    if iter_num % log_interval == 0:
        log.line(iter_num, get_lr(iter_num - 1), get_betas(iter_num - 1), gnorm, skipped)
    # eval and previews: rank 0's, but under fsdp every rank must join the forward (its shards are needed)
    if eval_interval and (iter_num % eval_interval == 0 or iter_num == max_iters) and procs.joins_forward:
        with log.paused(), ema.swapped() if ema and ema_eval else nullcontext():
            log.eval(iter_num, prediction, evaluate())
    if sample_interval and iter_num % sample_interval == 0 and procs.joins_forward:
        with log.paused(), ema.swapped() if ema and ema_eval else nullcontext():
            preview(iter_num)

if signals.received:
    sys.exit(128 + signals.received)  # stopped, not finished: the resume state holds the run, nothing is exported
if steps_ok == 0 and not export_only:  # every step was skipped: this run trained nothing, so it exports no v-pred model
    sys.exit(f"no optimizer step succeeded ({skipped} skipped as non-finite): nothing exported; lower the lr or "
             f"check the data")
if procs.joins_forward:
    export.export_run(sdxl, out_dir, config, base, imgs_per_iter, ema, write=procs.master)
procs.close()
