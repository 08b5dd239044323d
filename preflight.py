"""
Every mistake train.py's config (and the paths it names) can show, found before anything is loaded: one line
on stderr and exit 2 (configurator.UserError), never a traceback or a half-made run. The checks that need the
start checkpoint's header, the dataset scan or the resume state run where those are read, still before any
heavy work (train.py, runstate.py).
"""
import importlib.util
import math
import os

import torch

import configurator
import optim
import schedule
from configurator import UserError, UserFileNotFound

RUN_FILES = ("ckpt.pt", "ckpt", "model.safetensors")  # a folder holding one of these holds a run


def check_config(c, world):
    """c: train.py's config dict; world: the number of processes torchrun started (1 outside it)."""
    configurator.check(c, choices={
        "prediction": ("v", "eps"), "weighting": schedule.WEIGHTINGS, "optimizer": optim.OPTIMIZERS,
        "precision": ("amp", "bf16"), "dtype": ("float32", "bfloat16", "float16"), "crop": ("center", "random"),
        "export_dtype": ("fp16", "bf16", "fp32"), "lr_schedule": ("constant", "cosine"), "parallel": ("ddp", "fsdp"),
        "cache_dtype": ("fp32", "bf16", "fp16"), "ema_device": ("cpu", "cuda"), "compile_scope": ("unet", "blocks"),
        "compile_mode": tuple(torch._inductor.list_mode_options())}, at_least={
        "batch_size": 1, "grad_accum": 1, "max_iters": 1, "log_interval": 1, "ckpt_interval": 0, "eval_interval": 0,
        "eval_items": 1 if c["eval_interval"] else 0, "sample_interval": 0, "warmup_iters": 0, "ramp_iters": 0,
        "max_skips": 1, "make_synthetic": 0, "min_pixels": 0, "lr": 0, "min_lr": 0, "weight_decay": 0, "adam_eps": 0,
        "grad_clip": 0, "gamma": 0, "peak_tflops": 0, "bucket_step": 8, "resolution": c["bucket_step"]}, within={
        "caption_dropout": (0, 1), "beta1": (0, 1), "beta2": (0, 1), "beta1_final": (0, 1), "beta2_final": (0, 1),
        "beta_start": (0, 1), "beta_end": (c["beta_start"], 1), "k": (-math.inf, math.inf), "sample_steps": (1, 1000),
        "guidance": (-math.inf, math.inf), "cfg_phi": (0, 1), "ema_decay": (0, 1 - 1e-12),
        "ema_interval": (1, math.inf), "seed": (0, 2**32 - 1)})
    if c["grad_accum"] % world and c["grad_accum"] != 1:
        raise UserError(f"config error: --grad_accum={c['grad_accum']} must divide by the {world} processes (or be 1)")
    if c["bucket_step"] % 8:
        raise UserError(f"config error: --bucket_step={c['bucket_step']} must divide by 8 (the VAE's downsampling)")
    configurator.check_device(c["device"])
    if c["make_synthetic"] and not (c["synthetic_sizes"] and all(
            isinstance(s, (tuple, list)) and len(s) == 2 and all(isinstance(v, int) and v >= 8 for v in s)
            for s in c["synthetic_sizes"])):
        raise UserError(f"config error: --synthetic_sizes={c['synthetic_sizes']!r} must be (h, w) pairs of ints >= 8, "
                        f"e.g. ((1024, 1024), (832, 1216))")
    if c["wandb_log"] and importlib.util.find_spec("wandb") is None:
        raise UserError("config error: --wandb_log=True needs the wandb package (pip install wandb)")
    if c["sample_interval"] and not c["sample_prompts"]:
        raise UserError("config error: sample_interval needs at least one of sample_prompts")
    if c["parallel"] == "fsdp" and "RANK" not in os.environ:
        raise UserError("config error: --parallel=fsdp shards across processes: launch with torchrun "
                        "(--nproc_per_node=1 works too)")
    if c["ema_decay"] and c["ema_device"] == "cuda" and not c["device"].startswith("cuda"):
        raise UserError(f"config error: --ema_device=cuda, but the training device is {c['device']}")


def check_paths(c):
    """The dataset, the cache, the run folder and the start checkpoint, as far as their paths show."""
    dataset_dir, cache_dir, out_dir, init_from = c["dataset_dir"], c["cache_dir"], c["out_dir"], c["init_from"]
    if not dataset_dir or not (os.path.isdir(dataset_dir) or c["make_synthetic"]):
        raise UserFileNotFound(f"--dataset_dir={dataset_dir!r} is not a folder (a folder of images with .txt "
                               f"captions, or with a metadata.jsonl)")
    if cache_dir and os.path.realpath(cache_dir) == os.path.realpath(dataset_dir):  # (image subfolders: after the scan)
        raise UserError(f"--cache_dir={cache_dir!r} is the dataset folder; keep the cache elsewhere")
    resume = init_from == "resume"
    if not resume and not c["overwrite"] and any(os.path.exists(os.path.join(out_dir, f)) for f in RUN_FILES):
        raise UserError(f"{out_dir} holds a run already: continue it with --init_from=resume, or pass "
                        f"--overwrite=True to replace it, or pick another --out_dir")
    if not (resume or init_from == "random" or init_from.startswith("hf:") or os.path.isfile(init_from)
            or c["tiny_size"]):
        raise UserFileNotFound(f"--init_from={init_from!r}: no such file (a .safetensors path, hf:OWNER/NAME/FILE, "
                               f"'random' or 'resume')")


def check_buckets(model_cfg, bucket_step):
    """The latents are 1/f of the image and the UNet halves them (levels - 1) times: bucket sides must divide by
    both (model_cfg: the start checkpoint's, read from its header)."""
    multiple = 2 ** (len(model_cfg.vae.ch_mult) - 1) * 2 ** (len(model_cfg.unet.channel_mult) - 1)
    if bucket_step % multiple:
        raise UserError(f"config error: --bucket_step={bucket_step} must be a multiple of {multiple} for this model "
                        f"(VAE factor x UNet downsamplings)")
