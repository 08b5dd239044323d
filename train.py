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
import datetime
import importlib.util
import json
import math
import os
import platform
import random
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

import cache as encoder_cache
import checkpoint
import configurator
import data
import demo
import export
import files
import model
import optim
import perf
import schedule
import sharding
import tokenizer as clip_tokenizer

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
# debugging and tests, not training settings
debug_compile_backend = "inductor"  # torch.compile backend; the tests use Dynamo's 'eager' (tracing, no codegen)
debug_nan_at = -1  # make the loss NaN from this iteration on, to exercise the skip path
# -----------------------------------------------------------------------------
config = configurator.configure(globals())
# -----------------------------------------------------------------------------

# every mistake the config alone can show, found before anything is loaded: one line, exit 2
world = int(os.environ.get("WORLD_SIZE", 1))
configurator.check(config, choices={
    "prediction": ("v", "eps"), "weighting": schedule.WEIGHTINGS, "optimizer": optim.OPTIMIZERS, "precision": ("amp", "bf16"),
    "dtype": ("float32", "bfloat16", "float16"), "crop": ("center", "random"), "export_dtype": ("fp16", "bf16", "fp32"),
    "lr_schedule": ("constant", "cosine"), "parallel": ("ddp", "fsdp"), "cache_dtype": ("fp32", "bf16", "fp16"),
    "ema_device": ("cpu", "cuda"), "compile_mode": tuple(torch._inductor.list_mode_options())}, at_least={
    "batch_size": 1, "grad_accum": 1, "max_iters": 1, "log_interval": 1, "ckpt_interval": 0, "eval_interval": 0,
    "eval_items": 1 if eval_interval else 0, "sample_interval": 0, "warmup_iters": 0, "ramp_iters": 0, "max_skips": 1,
    "make_synthetic": 0, "min_pixels": 0, "lr": 0, "min_lr": 0, "weight_decay": 0, "adam_eps": 0, "grad_clip": 0,
    "gamma": 0, "peak_tflops": 0, "bucket_step": 8, "resolution": bucket_step}, within={
    "caption_dropout": (0, 1), "beta1": (0, 1), "beta2": (0, 1), "beta1_final": (0, 1), "beta2_final": (0, 1),
    "beta_start": (0, 1), "beta_end": (beta_start, 1), "k": (-math.inf, math.inf), "sample_steps": (1, 1000),
    "guidance": (-math.inf, math.inf), "cfg_phi": (0, 1), "ema_decay": (0, 1 - 1e-12), "ema_interval": (1, math.inf),
    "seed": (0, 2**32 - 1)})
if grad_accum % world and grad_accum != 1:
    raise configurator.UserError(f"config error: --grad_accum={grad_accum} must divide by the {world} processes (or be 1)")
if bucket_step % 8:
    raise configurator.UserError(f"config error: --bucket_step={bucket_step} must divide by 8 (the VAE's downsampling)")
configurator.check_device(device)
if not dataset_dir or not (os.path.isdir(dataset_dir) or make_synthetic):
    raise configurator.UserFileNotFound(f"--dataset_dir={dataset_dir!r} is not a folder (a folder of images with .txt "
                                        f"captions, or with a metadata.jsonl)")
if cache_dir and os.path.realpath(cache_dir) == os.path.realpath(dataset_dir):  # (image subfolders: after the scan)
    raise configurator.UserError(f"--cache_dir={cache_dir!r} is the dataset folder; keep the cache elsewhere")
if make_synthetic and not (synthetic_sizes and all(isinstance(s, (tuple, list)) and len(s) == 2 and all(
        isinstance(v, int) and v >= 8 for v in s) for s in synthetic_sizes)):
    raise configurator.UserError(f"config error: --synthetic_sizes={synthetic_sizes!r} must be (h, w) pairs of "
                                 f"ints >= 8, e.g. ((1024, 1024), (832, 1216))")
if wandb_log and importlib.util.find_spec("wandb") is None:
    raise configurator.UserError("config error: --wandb_log=True needs the wandb package (pip install wandb)")
if sample_interval and not sample_prompts:
    raise configurator.UserError("config error: sample_interval needs at least one of sample_prompts")
if parallel == "fsdp" and "RANK" not in os.environ:
    raise configurator.UserError("config error: --parallel=fsdp shards across processes: launch with torchrun "
                                 "(--nproc_per_node=1 works too)")
if ema_decay and ema_device == "cuda" and not device.startswith("cuda"):
    raise configurator.UserError(f"config error: --ema_device=cuda, but the training device is {device}")
resume, sharded = init_from == "resume", parallel == "fsdp"
# the resume state: ckpt.pt under ddp (one file), the folder ckpt/ under fsdp (each rank's shards)
ckpt_path = os.path.join(out_dir, "ckpt" if sharded else "ckpt.pt")
if resume and sharded:
    sharding.recover(ckpt_path)
if resume and not os.path.exists(ckpt_path):
    other = os.path.join(out_dir, "ckpt.pt" if sharded else "ckpt")
    hint = f" ({other} is there: resume with --parallel={'ddp' if sharded else 'fsdp'})" if os.path.exists(other) else ""
    raise configurator.UserFileNotFound(f"--init_from=resume: there is no {ckpt_path} to resume from{hint}")
if not resume and not overwrite and any(os.path.exists(os.path.join(out_dir, f)) for f in ("ckpt.pt", "ckpt", "model.safetensors")):
    raise configurator.UserError(f"{out_dir} holds a run already: continue it with --init_from=resume, or pass "
                                 f"--overwrite=True to replace it, or pick another --out_dir")
if not (resume or init_from == "random" or init_from.startswith("hf:") or os.path.isfile(init_from) or tiny_size):
    raise configurator.UserFileNotFound(f"--init_from={init_from!r}: no such file (a .safetensors path, hf:OWNER/NAME/FILE, "
                                        f"'random' or 'resume')")

# DDP, exactly as nanoGPT: torchrun sets RANK; each process owns one device and a share of each batch
distributed = int(os.environ.get("RANK", -1)) != -1
if distributed:
    init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    rank, local_rank, world = (int(os.environ[v]) for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    master_process = rank == 0
    grad_accum = max(1, grad_accum // world)
    # ranks also wait for each other while one makes the demo's data or encodes its share of the cache, which
    # can take hours: those waits use a CPU group of their own with a long timeout, not the training group's
    # minutes (the hang-up of diffusers issue #7960)
    slow_group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
else:
    rank, local_rank, world, master_process, slow_group = 0, 0, 1, True, None
imgs_per_iter = batch_size * grad_accum * world
device_type = "cuda" if device.startswith("cuda") else "cpu"
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
amp = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # few shapes (one per bucket): let cuDNN time its conv algorithms

# SIGINT/SIGTERM: before the first step there is nothing to save, so stop now (mid-compile too); from the
# first step on, finish the step, write ckpt.pt and exit. Either way the exit status is 128 + the signal.
stop_signal, training = None, False


def on_signal(signum, frame):
    global stop_signal
    stop_signal = signum
    if not training:
        print(f"got signal {signum} before the first step: nothing to save, stopping", flush=True)
        raise SystemExit(128 + signum)
    print(f"got signal {signum}: writing a checkpoint after this step", flush=True)


signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)

# -----------------------------------------------------------------------------
# the resume state (read lazily: only what is used is paged in) and the start checkpoint: the frozen VAE and
# text encoders always come from the start checkpoint, the UNet too unless resuming
ckpt = None
if resume:
    try:  # weights_only: plain containers and tensors, never code (a planted pickle fails here)
        if sharded:  # the plain values; the shards are read once the UNet is sharded
            ckpt = torch.load(os.path.join(ckpt_path, "run.pt"), map_location="cpu", weights_only=True)
        else:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        base, iter_num, skipped = ckpt["base"], ckpt["iter_num"], ckpt["skipped"]
    except Exception as e:
        raise configurator.UserError(f"cannot resume: {ckpt_path} is not a checkpoint this code wrote, or is damaged "
                                     f"({type(e).__name__}); start a fresh run in another --out_dir") from None
    if ckpt["config"]["optimizer"] != optimizer:
        raise configurator.UserError(f"cannot resume the {optimizer} optimizer from {ckpt_path}: it holds "
                                     f"{ckpt['config']['optimizer']} state; resume with --optimizer={ckpt['config']['optimizer']}")
    if sharded and optimizer == "adamw8bit" and ckpt["world"] != world:
        raise configurator.UserError(f"{ckpt_path} holds adamw8bit state for {ckpt['world']} processes, one buffer "
                                     f"each: resume with {ckpt['world']} (adamw and adafactor state reshard to any count)")
    if iter_num >= max_iters:
        raise configurator.UserError(f"{ckpt_path} is at iter {iter_num} already: pass --max_iters above {iter_num} "
                                     f"to train further")
    data.check_order(ckpt["per_rank"][0]["loader"], seed, batch_size * world)  # before the cache is built
else:
    base, iter_num, skipped = init_from, 0, 0  # what the run started from, even when resuming


start_path = None if base == "random" else checkpoint.fetch(base)
if tiny_size and start_path and not os.path.exists(start_path):
    if master_process:
        demo.make_tiny_start(start_path)
    if distributed:
        torch.distributed.barrier(group=slow_group)
try:
    model_cfg = model.SDXLConfig() if base == "random" else checkpoint.read_config(start_path)
except checkpoint.CheckpointError as e:
    raise configurator.UserError(f"cannot load {start_path}: {e}") from None
# the latents are 1/f of the image and the UNet halves them (levels - 1) times: bucket sides must divide by both
multiple = 2 ** (len(model_cfg.vae.ch_mult) - 1) * 2 ** (len(model_cfg.unet.channel_mult) - 1)
if bucket_step % multiple:
    raise configurator.UserError(f"config error: --bucket_step={bucket_step} must be a multiple of {multiple} for "
                                 f"this model (VAE factor x UNet downsamplings)")
run_lock = files.lock(out_dir) if master_process else None  # one run per out_dir, released when this process ends
cache_dir = cache_dir or os.path.join(out_dir, "cache")
files.make_dir(cache_dir, "cache_dir")
if master_process:
    print(f"global batch {imgs_per_iter} = {batch_size} micro x {grad_accum} accum x {world} procs")

# -----------------------------------------------------------------------------
# data: scan, hold out the eval items, cache latents and text embeddings once, then a resumable loader
if make_synthetic and master_process and not os.path.isdir(dataset_dir):
    demo.make_synthetic_dataset(dataset_dir, n=make_synthetic, seed=0, sizes=synthetic_sizes)
if make_synthetic and master_process and not tokenizer.startswith("hf:") and not os.path.exists(os.path.join(tokenizer, "vocab.json")):
    # the synthetic demo's vocabulary is learned from its own captions, so it works offline
    demo.build_tiny_vocab(tokenizer, [it.caption for it in data.scan_dataset(dataset_dir, quiet=True)])
if distributed:
    torch.distributed.barrier(group=slow_group)
tok = clip_tokenizer.load_tokenizer(tokenizer)
buckets = data.make_buckets(area=resolution * resolution, step=bucket_step)
items = data.scan_dataset(dataset_dir, buckets=buckets, seed=seed, crop=crop, flip=flip,
                          min_pixels=min_pixels or min(h * w for h, w in buckets) // 4)
if not items:
    raise configurator.UserError(f"{dataset_dir}: no usable images (see the lines above); add .png, .jpg, .jpeg "
                                 f"or .webp files")
if len(items) <= eval_items:
    raise configurator.UserError(f"{dataset_dir}: {len(items)} usable images, but {eval_items} are held out for the "
                                 f"eval (eval_items): add images or lower --eval_items")
eval_set, train_set = data.split_eval(items, eval_items, quiet=not master_process)
encoder_cache.check_dir(cache_dir, items)  # before the model is loaded

if base == "random":  # SDXL-shaped random weights, for benchmarks: same weights in every process
    with torch.device(device):  # built and randomised in place: 3.5B parameters are slow to fill on a CPU
        sdxl = model.SDXL()
    model.init_random_(sdxl, seed=seed)
else:
    sdxl = checkpoint.load_checkpoint(start_path, device=device, dtype=torch.float32)
if resume and not sharded:
    sdxl.unet.load_state_dict(ckpt["unet"])
sdxl.requires_grad_(False)
unet = sdxl.unet
unet.requires_grad_(True)
unet.train()
unet.grad_ckpt = grad_ckpt
if device_type == "cuda" and not sharded:  # (FSDP shards contiguous weights only; activations stay NHWC)
    unet.to(memory_format=torch.channels_last)  # cuDNN's fast convolutions are NHWC
if precision == "bf16":  # halves weight and grad memory; AdamW8bit then writes back with stochastic rounding
    if optimizer != "adamw8bit":
        print(f"WARNING: pure bf16 weights with {optimizer} round each update to nearest: at lr < 1e-5 most "
              "updates are lost (docs/maths.md §7); adamw8bit keeps them with stochastic rounding")
    unet.to(torch.bfloat16)

cache = encoder_cache.build_cache(items, sdxl, tok, cache_dir, device=device,
                                  rank=rank, world=world, group=slow_group, dtype=getattr(torch, {
                                      "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cache_dtype]))
loader = data.Loader(train_set, cache, batch_size=batch_size, rank=rank, world=world,
                     seed=seed, caption_dropout=caption_dropout)  # rank 0 prints the bucket histogram

# after caching, the text encoders are needed only for the preview prompts: encode those, then move the
# encoders off the GPU (the VAE stays, to decode previews)
preview_text = None
if sample_interval and (master_process or sharded):
    import sample_ablation
    preview_text = sample_ablation.encode_prompts(sdxl, tok, list(sample_prompts), device)
sdxl.te1.to("cpu")
sdxl.te2.to("cpu")

# -----------------------------------------------------------------------------
# schedule, optimizer, lr and betas

abar = schedule.alphas_cumprod(beta_end, zsnr, beta_start).to(device)  # float64, cast at use
T = len(abar)


def get_lr(it):
    """Linear warmup, then constant or cosine down to min_lr at ramp_iters (a pure function of it)."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if lr_schedule == "constant":
        return lr
    ratio = min(1.0, (it - warmup_iters) / max(1, ramp_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def get_betas(it):
    """Adam betas ramped linearly (beta1, beta2) -> (beta1_final, beta2_final) over ramp_iters."""
    r = min(1.0, it / max(1, ramp_iters))
    return (beta1 + r * (beta1_final - beta1), beta2 + r * (beta2_final - beta2))


train_buckets = sorted({it.bucket for it in train_set})
if compile:
    # Inductor specialises the latent size (mark_dynamic on h, w fails with a ConstraintViolationError), so each
    # bucket is its own static graph. Dynamo allows 8 per function by default and, under fullgraph=True, the
    # 9th bucket would stop the run with FailOnRecompileLimitHit hours in: make room for every bucket (under
    # FSDP every block instance compiles its own graphs on Block.forward: room for all of them).
    torch._dynamo.config.automatic_dynamic_shapes = False
    graphs = (len(train_buckets) + 2) * (len(sharding.blocks(unet)) if sharded else 1)
    torch._dynamo.config.recompile_limit = max(8, graphs)
    torch._dynamo.config.accumulated_recompile_limit = max(256, 2 * graphs)
compile_kwargs = dict(fullgraph=True, backend=debug_compile_backend, mode=compile_mode) if compile else None
if sharded:  # blocks gathered in the compute dtype under amp (halves the all-gathers), grads reduced in fp32
    sharding.shard(unet, ptdtype if precision == "amp" and ptdtype != torch.float32 else None, compile_kwargs)
opt = optim.configure_optimizer(unet.parameters(), optimizer, lr, get_betas(0), adam_eps, weight_decay,
                                fused=device_type == "cuda", seed=seed)
ema = optim.EMA(unet.named_parameters(), ema_decay, device if ema_device == "cuda" else "cpu") if ema_decay else None


def resume_tensors():
    """The tensors of the FSDP resume state, each rank's shards (DCP writes and reads them in parallel): the
    UNet's, the optimizer's (adamw8bit's flat buffers under this rank's own key) and the EMA's."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    out = {"unet": unet.state_dict()}
    if optimizer == "adamw8bit":
        sd = opt.state_dict()
        mine = {f"{i}.{key}": t for i, buf in enumerate(sd["buffers"]) for key, t in buf.items()}
        if sd["sr_gen"] is not None:
            mine["sr_gen"] = sd["sr_gen"]
        out["optimizer"] = {f"rank{rank}": mine}
    else:
        out["optimizer"] = get_optimizer_state_dict(unet, opt)["state"]
    if ema:
        out["ema"] = {name: sharding.like(p, s) for name, p, s in zip(ema.names, ema.params, ema.shadow)}
    return out


if resume and sharded:  # every tensor read in place; another process count is resharded by DCP
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    tensors = resume_tensors()
    if ema and not ckpt["ema"]:  # an EMA switched on at resume starts from the resumed weights
        tensors.pop("ema")
    if optimizer != "adamw8bit":
        osd = get_optimizer_state_dict(unet, opt)
        tensors["optimizer"] = osd["state"]
    elif ckpt["per_rank"][rank]["optimizer"]["sr"]:  # the stochastic-rounding generator's state, to be filled
        tensors["optimizer"][f"rank{rank}"]["sr_gen"] = torch.Generator(device=device).get_state()
    try:
        sharding.load_sharded(ckpt_path, tensors)
    except (Exception, sharding.dcp.api.CheckpointException) as e:  # another model than the one saved
        raise configurator.UserError(f"cannot resume from {ckpt_path}: its shards are damaged or are not this "
                                     f"model's ({type(e).__name__})") from None
    unet.load_state_dict(tensors["unet"])
    if optimizer == "adamw8bit":
        mine, plain = tensors["optimizer"][f"rank{rank}"], ckpt["per_rank"][rank]["optimizer"]
        opt.load_state_dict({**plain, "sr_gen": mine.get("sr_gen"), "buffers": [
            {key.split(".", 1)[1]: t for key, t in mine.items() if key.startswith(f"{i}.")} for i in range(len(opt.buffers))]})
    else:
        set_optimizer_state_dict(unet, opt, osd)
    if ema and ckpt["ema"]:
        for s, t in zip(ema.shadow, tensors["ema"].values()):
            s.copy_(sharding.local(t))
elif resume:
    try:
        opt.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:  # another optimizer, or another parameter set: one line, nothing written
        raise configurator.UserError(f"cannot resume the {optimizer} optimizer from {ckpt_path}: its saved state is "
                                     f"another optimizer's or for other parameters ({e!r})") from None
    if ema and "ema" in ckpt:
        for s, name in zip(ema.shadow, ema.names):
            s.copy_(ckpt["ema"][name])

train_unet = unet  # what the loop calls: compiled and/or DDP-wrapped; `unet` stays the raw module that is saved
if compile and not sharded:  # (under FSDP each block is compiled in place: sharding.shard)
    train_unet = torch.compile(unet, **compile_kwargs)
if distributed and not sharded:
    train_unet = DDP(train_unet, device_ids=[local_rank] if device_type == "cuda" else None)

# -----------------------------------------------------------------------------
# one loss evaluation: the whole recipe is these lines


def per_sample_mse(net, batch, t, noise):
    """||target_i - out_i||^2 / (C H W) for each sample: the training target on the training schedule."""
    x0 = batch["latents"]
    z = schedule.add_noise(x0, noise, t, abar)
    if device_type == "cuda":
        z = z.contiguous(memory_format=torch.channels_last)
    target = schedule.v_target(x0, noise, t, abar) if prediction == "v" else noise
    with amp:
        out = net(z, t, batch["context"], model.build_y(batch["pooled"], batch["time_ids"]))
    return (out.float() - target).pow(2).mean(dim=(1, 2, 3))  # (B,)


def forward_loss(batch, t, noise):
    """mean_i m(t_i) * mse_i; returns (loss, per-sample unweighted MSE)."""
    mse = per_sample_mse(train_unet, batch, t, noise)
    return (schedule.loss_weight(t, abar, weighting, k, gamma) * mse).mean(), mse


def to_device(batch):
    return {key: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for key, v in batch.items()}


EVAL_T = torch.tensor([b * 100 + o for b in range(10) for o in (0, 50, 99)])  # 3 fixed t per 100-wide bin, 999 included


@torch.no_grad()
def evaluate():
    """Held-out target-MSE per t-bin on fixed items with fixed noise (the uptrain-progress curve, docs/maths.md §6)."""
    unet.eval()
    g = torch.Generator().manual_seed(0)
    by_bucket = {}  # one batch per bucket: latents of different sizes cannot be stacked
    for it in eval_set:
        by_bucket.setdefault(it.bucket, []).append(it)
    sums = torch.zeros(10)
    for bucket_items in by_bucket.values():
        batch = to_device(data.collate(bucket_items, cache))
        shape = batch["latents"].shape
        for i, t_val in enumerate(EVAL_T.tolist()):
            noise = torch.randn(shape, generator=g).to(device)
            t = torch.full((shape[0],), t_val, dtype=torch.long, device=device)
            sums[i // 3] += per_sample_mse(unet, batch, t, noise).sum().item()
    unet.train()
    return (sums / (3 * len(eval_set))).tolist()


def preview(it):
    import sample_ablation
    context, pooled = preview_text
    n = len(sample_prompts)
    h = w = resolution
    g = torch.Generator().manual_seed(seed)
    f = 2 ** (len(sdxl.cfg.vae.ch_mult) - 1)  # the VAE's downsampling factor (8 in SDXL)
    noise = torch.randn(n, sdxl.cfg.unet.in_channels, h // f, w // f, generator=g).to(device)
    unet.eval()
    imgs = sample_ablation.generate(sdxl, context, pooled, noise, abar, sample_steps, prediction, guidance,
                                    cfg_phi, h, w)
    unet.train()
    if master_process:
        sample_ablation.save_grid(imgs, 1, n, os.path.join(out_dir, "samples", f"iter_{it:06d}.png"))


# -----------------------------------------------------------------------------
# checkpoints: everything a bit-exact resume needs, per-rank RNG and loader state included


def rng_state():
    """Every generator's state as tensors and plain values, so that ckpt.pt loads with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device_type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather(obj):
    """Every rank's object on every rank (a list by rank); no-op list outside DDP."""
    if not distributed:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def save_ckpt(it, loader_state):
    """The resume state after iteration `it` (ckpt.pt, or ckpt/ under fsdp); loader_state: the loader's state
    after the last batch the loop consumed."""
    mine = {"rng": rng_state(), "loader": loader_state}
    if sharded and optimizer == "adamw8bit":  # this rank's buffers go to DCP, their plain companions here
        sd = opt.state_dict()
        mine["optimizer"] = {"n_steps": sd["n_steps"], "layout": sd["layout"], "param_groups": sd["param_groups"],
                             "sr": sd["sr_gen"] is not None}
    plain = {"iter_num": it, "base": base, "per_rank": gather(mine), "skipped": skipped, "config": config,
             "tokenizer": tokenizer, "world": world, "ema": ema is not None}
    if sharded:
        sharding.save_sharded(ckpt_path, resume_tensors(), plain, master_process)
        if master_process:
            print(f"saved {ckpt_path}/ at iter {it}")
    elif master_process:
        state = {"unet": unet.state_dict(), "optimizer": opt.state_dict(), **plain}
        if ema:
            state["ema"] = dict(zip(ema.names, ema.shadow))
        size = sum(p.numel() * p.element_size() for p in unet.parameters()) * 2  # weights + state, roughly
        with files.atomic_path(ckpt_path, size) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)  # through a Python file, so a full disk surfaces as the OSError it is
        print(f"saved {ckpt_path} at iter {it}")


def export_model():
    """out_dir/model.safetensors (sgm layout, markers, metadata), model_ema.safetensors with the EMA weights, and
    out_dir/diffusers/ (configs for from_single_file). Under fsdp every rank takes part (one tensor is gathered
    at a time) and rank 0 writes."""
    recipe = {key: config[key] for key in ("prediction", "beta_start", "beta_end", "zsnr", "weighting", "k",
                                           "optimizer", "lr", "beta1", "beta2", "beta1_final", "beta2_final",
                                           "max_iters", "batch_size")}
    recipe.update(base=base, global_batch=imgs_per_iter)
    meta = {"modelspec.title": f"SDXL {prediction}-pred uptrain", "modelspec.date": time.strftime("%Y-%m-%d"),
            "noise_schedule": json.dumps({"beta_start": beta_start, "beta_end": beta_end, "beta_schedule":
                                          "scaled_linear", "zsnr": zsnr, "timestep_spacing": "trailing",
                                          "num_train_timesteps": T}),
            "training_config": json.dumps(recipe)}
    out_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[export_dtype]
    for name, weights in (("model", nullcontext()), ("model_ema", ema and ema.swapped())):
        if weights is not None:
            with weights:
                checkpoint.save_checkpoint(sdxl, os.path.join(out_dir, f"{name}.safetensors"), v_pred=prediction == "v",
                                           ztsnr=zsnr, metadata=meta, dtype=out_dtype, write=master_process)
    if master_process:
        tok_dir = clip_tokenizer.tokenizer_folder(tokenizer)
        export.write_diffusers_config(sdxl.cfg, os.path.join(out_dir, "diffusers"), beta_end=beta_end, zsnr=zsnr,
                                      prediction=prediction, tokenizer_dirs=(tok_dir, tok_dir), beta_start=beta_start)
        print(f"exported {out_dir}/model.safetensors{'' if ema is None else ', model_ema.safetensors'} and diffusers/")


# seed here, after every setup step (making a start checkpoint draws from the RNG, loading one does not);
# the same seed on every process, see the noise draw in the loop
random.seed(seed)
np.random.seed(seed)
torch.manual_seed(seed)
if resume:
    # the ranks' states are equal (one global draw, sliced), so another process count with the same global
    # batch resumes exactly from rank 0's
    per_rank = ckpt["per_rank"]
    rank_state = per_rank[rank] if len(per_rank) == world else per_rank[0]
    loader.load_state_dict(rank_state["loader"])
    set_rng_state(rank_state["rng"])
    print(f"resumed from {ckpt_path} at iter {iter_num}")
    del ckpt
loader_state = loader.state_dict()  # the loader's state after the last batch the loop consumed
batches = data.prefetch(loader, pin_memory=device_type == "cuda")

# -----------------------------------------------------------------------------
# logging: run.json, FLOPs for MFU, the per-line stats

peak = peak_tflops or (perf.peak_tflops(torch.cuda.get_device_name(device)) if device_type == "cuda" else 0.0)
flops_per_image = {}  # (h, w) of the latents -> model FLOPs of one image's forward + backward


if master_process:
    run_info = {"git_sha": perf.git_sha(), "argv": sys.argv, "python": platform.python_version(), "torch": torch.__version__,
                "device": torch.cuda.get_device_name(device) if device_type == "cuda" else platform.processor() or "cpu",
                "world_size": world, "config": config}
    files.write_json(os.path.join(out_dir, "run.json"), run_info, indent=1, default=str)
    if wandb_log:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)

if compile and compile_warm:
    # pay every bucket's compile (and cuDNN autotune) now, where it is timed, not inside the run: one
    # forward+backward per bucket at t = 0 with zero noise (no random numbers drawn, so resume stays exact);
    # the grads are zeroed, the optimizer never sees them
    warm_start = time.time()
    if distributed and not sharded:  # no gradient all-reduce for these (FSDP would keep unsynced grads for later)
        train_unet.require_backward_grad_sync = False
    for bucket in train_buckets:
        bucket_start = time.time()
        bucket_items = [it for it in train_set if it.bucket == bucket]
        batch = to_device(data.collate((bucket_items * batch_size)[:batch_size], cache))
        forward_loss(batch, torch.zeros(batch_size, dtype=torch.long, device=device),
                     torch.zeros_like(batch["latents"]))[0].backward()
        if device_type == "cuda":
            torch.cuda.synchronize()
        if master_process:
            print(f"compiled bucket {bucket[0]}x{bucket[1]}: {time.time() - bucket_start:.1f} s")
    opt.zero_grad(set_to_none=True)
    if master_process:
        print(f"compiled {len(train_buckets)} buckets in {time.time() - warm_start:.1f} s")

# -----------------------------------------------------------------------------
# the training loop


def new_log():  # per-interval sums, kept on the device: nothing in the step waits for the host but the skip test
    return {"loss": torch.zeros((), device=device), "n": 0, "bins": torch.zeros(10, device=device),
            "bin_n": torch.zeros(10, device=device), "imgs": 0, "flops": 0.0}


log = new_log()
consecutive, steps_ok = 0, 0  # non-finite steps in a row; optimizer steps this process made
first_iter = iter_num
training = True  # a signal from here on waits for the step to end and writes ckpt.pt
t0 = time.time()
while iter_num < max_iters:
    lr_now, betas_now = get_lr(iter_num), get_betas(iter_num)
    for group in opt.param_groups:
        group["lr"] = lr_now
        if "betas" in group:
            group["betas"] = betas_now

    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        batch, loader_state = next(batches)
        batch = to_device(batch)
        b = batch["latents"].shape[0]
        # t and noise are drawn for the whole global batch from an RNG seeded alike on every process, and each
        # process takes its slice: N processes then compute exactly the single-process update
        my_slice = slice(rank * b, (rank + 1) * b)
        t = torch.randint(0, T, (b * world,))[my_slice].to(device)
        noise = torch.randn(b * world, *batch["latents"].shape[1:])[my_slice].to(device)
        if sharded:  # only reduce gradients on the last micro-step
            unet.set_requires_gradient_sync(micro == grad_accum - 1)
        elif distributed:
            train_unet.require_backward_grad_sync = micro == grad_accum - 1
        loss, mse = forward_loss(batch, t, noise)
        if 0 <= debug_nan_at <= iter_num:
            loss = loss * float("nan")
        (loss / grad_accum).backward()
        loss_sum += loss.detach() / grad_accum
        t_bin = (t // (T // 10)).clamp(max=9)
        log["bins"].index_add_(0, t_bin, mse.detach().float())
        log["bin_n"].index_add_(0, t_bin, torch.ones(b, device=device))
        log["imgs"] += b * world
        hw = tuple(batch["latents"].shape[-2:])
        if hw not in flops_per_image:
            flops_per_image[hw] = perf.unet_flops(sdxl.cfg.unet, *hw)
        log["flops"] += b * world * flops_per_image[hw]

    # a non-finite loss or gradient skips the step: weights and optimizer state untouched. AdamW8bit applies the
    # clip factor as its kernels read the grads (no pass over them to scale); the others are clipped in place
    gnorm, coef = optim.clip_factor(opt, unet.parameters(), grad_clip if grad_clip > 0 else math.inf)
    ok = torch.isfinite(gnorm) & torch.isfinite(loss_sum)
    if distributed:  # every process takes the same decision
        ok = ok.float()
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        ok = ok.bool()
    # the one host sync of the step, the skip decision and the clip factor in one transfer: bitsandbytes has no
    # on-device skip and takes the factor as a float, and a skipped step must not touch the optimizer state
    ok, coef = torch.stack([ok.float(), coef.float()]).tolist()
    if ok:
        opt.step(gnorm_scale=coef) if isinstance(opt, optim.FlatAdamW8bit) else opt.step()
        consecutive, steps_ok = 0, steps_ok + 1
        if ema and (iter_num + 1 - skipped) % ema_interval == 0:  # every ema_interval successful steps
            ema.update()
    else:
        skipped += 1
        consecutive += 1
        print(f"iter {iter_num}: non-finite loss/grad (loss {loss_sum.item():.4g}, grad norm {gnorm.item():.4g}), step skipped")
    opt.zero_grad(set_to_none=True)
    iter_num += 1
    if iter_num == first_iter + 1 and master_process:  # on CUDA this step compiled the UNet: report it apart
        print(f"first step (compile, cuDNN autotune) {time.time() - t0:.1f} s")
    if bool(ok):
        log["loss"] += loss_sum
        log["n"] += 1

    if consecutive >= max_skips:
        save_ckpt(iter_num, loader_state)
        sys.exit(f"stopping: {consecutive} non-finite steps in a row (lower lr? check the data); ckpt.pt written")

    if iter_num % log_interval == 0:
        if distributed:  # the loss and t-bin errors of the global batch, not of this process's share
            sums = torch.cat([log["loss"].view(1), log["bins"], log["bin_n"]])
            torch.distributed.all_reduce(sums)
            log.update(loss=sums[0] / world, bins=sums[1:11], bin_n=sums[11:])  # (n is the same on every process)
        if master_process:
            if device_type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.time() - t0
            ips = log["imgs"] / elapsed
            mfu = f"{100 * log['flops'] / elapsed / (peak * 1e12):.1f}%" if peak else "-"
            mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}GiB" if device_type == "cuda" else "-"
            eta = (max_iters - iter_num) * elapsed / log_interval
            bins, bin_n = (log["bins"] / log["bin_n"].clamp(min=1)).tolist(), log["bin_n"].tolist()
            loss_avg = log["loss"].item() / log["n"] if log["n"] else float("nan")
            shown = f"{loss_avg:.5f}" if log["n"] else "- (every step skipped)"
            print(f"iter {iter_num}: loss {shown}, lr {lr_now:.3g}, betas ({betas_now[0]:.4f}, {betas_now[1]:.4f}), "
                  f"gnorm {gnorm.item():.3g}, {ips:.2f} img/s, {1000 * elapsed / log_interval:.0f} ms/it, mfu {mfu}, "
                  f"mem {mem}, skipped {skipped}, eta {eta / 60:.1f} min")
            print("  t-bin mse " + " ".join(f"{v:.4f}" if n else "-" for v, n in zip(bins, bin_n)))
            if wandb_log:
                wandb.log({"iter": iter_num, "loss": loss_avg, "lr": lr_now, "img_s": ips,
                           **{f"mse_bin{i}": v for i, v in enumerate(bins)}})
        log = new_log()
        t0 = time.time()

    # eval and previews: rank 0's, but under fsdp every rank must join the forward (its shards are needed)
    if eval_interval and (iter_num % eval_interval == 0 or iter_num == max_iters) and (master_process or sharded):
        with ema.swapped() if ema and ema_eval else nullcontext():
            bins = evaluate()
        if master_process:
            print(f"eval iter {iter_num}: held-out {prediction}-mse per t-bin " + " ".join(f"{v:.4f}" for v in bins))
            with open(os.path.join(out_dir, "eval.jsonl"), "a") as f:
                f.write(json.dumps({"iter": iter_num, "target": prediction, "mse_bins": bins}) + "\n")
        t0 = time.time()
    if sample_interval and iter_num % sample_interval == 0 and (master_process or sharded):
        with ema.swapped() if ema and ema_eval else nullcontext():
            preview(iter_num)
        t0 = time.time()
    if (ckpt_interval and iter_num % ckpt_interval == 0) or iter_num == max_iters or stop_signal:
        save_ckpt(iter_num, loader_state)
    if stop_signal:
        break

if stop_signal:
    sys.exit(128 + stop_signal)  # stopped, not finished: ckpt.pt holds the run, nothing is exported
if steps_ok == 0:  # every step was skipped: this run trained nothing, so it exports no v-pred model
    sys.exit(f"no optimizer step succeeded ({skipped} skipped as non-finite): nothing exported; lower the lr or "
             f"check the data")
if master_process or sharded:
    export_model()
if distributed:
    destroy_process_group()
