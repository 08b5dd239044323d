"""
Every mistake train.py's config and the paths it names can show, found before anything is loaded: one line on
stderr and exit 2 (configurator.UserError). The checks that need the start checkpoint's header, the dataset scan
or the resume state run where those are read, still before any heavy work (train.py, runstate.py).
"""
import importlib.util
import math
import os

import torch

import configurator
import distributed
import objective
import optim
import schedule
import tokenizer as clip_tokenizer
from configurator import UserError, UserFileNotFound

RUN_FILES = ("ckpt.pt", "ckpt", "ckpt.old", "model.safetensors")  # a folder holding one of these holds a run
# what a run writes in out_dir: --overwrite=True removes these (and nothing else) before a fresh run starts;
# the cache is kept (its entries are keyed by what made them, so a new run reuses or ignores them)
RUN_OUTPUTS = ("ckpt.pt", "ckpt", "ckpt.new", "ckpt.old", "model.safetensors", "model_ema.safetensors", "diffusers",
               "README.md", "eval.jsonl", "run.json", "samples", "tensorboard")


def check_config(c, world):
    """c: train.py's config dict; world: the number of processes torchrun started (1 outside it)."""
    configurator.check(c, choices={
        "prediction": ("v", "eps"), "weighting": schedule.WEIGHTINGS, "optimizer": optim.OPTIMIZERS,
        "precision": ("amp", "bf16"), "dtype": ("float32", "bfloat16", "float16"), "crop": ("center", "random"),
        "export_dtype": ("fp16", "bf16", "fp32"), "lr_schedule": ("constant", "cosine"), "parallel": ("ddp", "fsdp"),
        "cache_dtype": ("fp32", "bf16", "fp16"), "ema_device": ("cpu", "cuda"), "compile_scope": distributed.SCOPES,
        "max_token_length": clip_tokenizer.MAX_TOKEN_LENGTHS,
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
    for package in ("wandb", "tensorboard"):
        if c[f"{package}_log"] and importlib.util.find_spec(package) is None:
            raise UserError(f"config error: --{package}_log=True needs the {package} package (pip install {package})")
    if c["sample_interval"] and not c["sample_prompts"]:
        raise UserError("config error: sample_interval needs at least one of sample_prompts")
    if not (isinstance(c["sample_prompts"], (tuple, list)) and all(isinstance(p, str) for p in c["sample_prompts"])):
        raise UserError(f"config error: --sample_prompts={c['sample_prompts']!r} must be a list of strings")
    if c["lr"] <= 0:
        raise UserError(f"config error: --lr={c['lr']!r} trains nothing; the recipe uses 7.5e-6")
    abar = schedule.alphas_cumprod(c["beta_end"], c["zsnr"], c["beta_start"])
    m = objective.Objective(abar, weighting=c["weighting"], k=c["k"], gamma=c["gamma"]).weight(torch.arange(len(abar)))
    if not m.any():
        raise UserError(f"config error: --weighting={c['weighting']} with k={c['k']}, gamma={c['gamma']} is zero at "
                        f"every t: it trains nothing")
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
    dataset = os.path.realpath(dataset_dir)
    if cache_dir and os.path.realpath(cache_dir) == dataset:  # (image subfolders: after the scan)
        raise UserError(f"--cache_dir={cache_dir!r} is the dataset folder; keep the cache elsewhere")
    if os.path.commonpath([os.path.realpath(out_dir), dataset]) == dataset:
        raise UserError(f"--out_dir={out_dir!r} is in the dataset folder: the next run would train on its previews; "
                        f"keep runs elsewhere")
    resume = init_from == "resume"
    if not resume and not c["overwrite"] and any(os.path.exists(os.path.join(out_dir, f)) for f in RUN_FILES):
        raise UserError(f"{out_dir} holds a run already: continue it with --init_from=resume, or pass "
                        f"--overwrite=True to replace it, or pick another --out_dir")
    if not (resume or init_from == "random" or init_from.startswith("hf:") or os.path.isfile(init_from)
            or c["tiny_size"]):
        raise UserFileNotFound(f"--init_from={init_from!r}: no such file (a .safetensors path, hf:OWNER/NAME/FILE, "
                               f"'random' or 'resume')")


def check_buckets(model_cfg, c):
    """The latents are 1/f of the image and the UNet halves them (levels - 1) times: bucket sides and the
    previews' side (resolution) must divide by both (model_cfg: from the start checkpoint's header)."""
    multiple = 2 ** (len(model_cfg.vae.ch_mult) - 1) * 2 ** (len(model_cfg.unet.channel_mult) - 1)
    if c["bucket_step"] % multiple:
        raise UserError(f"config error: --bucket_step={c['bucket_step']} must be a multiple of {multiple} for this "
                        f"model (VAE factor x UNet downsamplings)")
    if c["sample_interval"] and c["resolution"] % multiple:
        raise UserError(f"config error: the previews are resolution x resolution: --resolution={c['resolution']} "
                        f"must be a multiple of {multiple} for this model (or --sample_interval=0)")


def clean_run_folder(out_dir, cache_dir, fresh):
    """Remove what --overwrite=True replaces (fresh) and the temp files a killed run left; a shared cache is never
    entered. Called by the process that holds the run's lock."""
    import shutil
    import files
    for name in RUN_OUTPUTS if fresh else ():
        path = os.path.join(out_dir, name)
        if name == "README.md" and os.path.isfile(path) and "v-prediction" not in open(path, errors="replace").read():
            continue  # a README.md this code did not write (its model cards are tagged v-prediction)
        if os.path.isdir(path) and not os.path.islink(path) and os.path.realpath(path) != os.path.realpath(cache_dir):
            shutil.rmtree(path)
        elif os.path.lexists(path) and not os.path.isdir(path):
            os.remove(path)
    files.remove_temps(out_dir, keep=[cache_dir])
