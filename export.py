"""
The export that train.py and transfer.py --mode=apply write (write_export): the single file (checkpoint.py), the
model card (card.py) and a diffusers config folder, so that diffusers loads it offline with the right scheduler
(no UI reads beta_end 0.024 or zero terminal SNR from the file, docs/sdxl_format.md §6); diffusers is not imported:

    StableDiffusionXLPipeline.from_single_file("out/vpred/model.safetensors", config="out/vpred/diffusers",
                                               local_files_only=True)
"""
import json
import os
import time
from collections.abc import Mapping
from contextlib import nullcontext

import card
import checkpoint
import files
from model import TIME_ID_DIM, VAE_SCALE, SDXLConfig, UNetConfig


def diffusers_unet_config(u: UNetConfig) -> dict:
    """UNet2DConditionModel's config for a model.UNetConfig (also what bench.py builds diffusers' UNet from)."""
    # diffusers builds the middle block with the deepest level's depth, so the two must agree
    assert u.transformer_depth_middle == u.transformer_depth[-1], "diffusers: middle depth must equal last level's"
    attn_levels = [d > 0 for d in u.transformer_depth]
    return {"sample_size": 128, "in_channels": u.in_channels,
            "out_channels": u.out_channels, "layers_per_block": u.num_res_blocks,
            "block_out_channels": [u.model_channels * m for m in u.channel_mult],
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels)],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            # diffusers' attention_head_dim holds head COUNTS (C // 64); levels without attention ignore it
            "attention_head_dim": [max(1, u.model_channels * m // u.head_dim) for m in u.channel_mult],
            "transformer_layers_per_block": [max(1, d) for d in u.transformer_depth],
            "cross_attention_dim": u.context_dim, "use_linear_projection": True, "norm_num_groups": u.num_groups,
            "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
            "addition_embed_type": "text_time", "addition_time_embed_dim": TIME_ID_DIM,
            "projection_class_embeddings_input_dim": u.adm_in_channels, "upcast_attention": False}


def write_diffusers_config(cfg: SDXLConfig, folder, beta_end=0.012, zsnr=False, prediction="v", tokenizer_dirs=None,
                           beta_start=0.00085):
    """model_index.json + scheduler/unet/vae/text_encoder(_2)/tokenizer(_2) configs for `cfg`; the scheduler is DDIM,
    trailing spacing, final step to x0 (schedule.py's sampler). tokenizer_dirs: (dir1, dir2) with vocab.json +
    merges.txt each, or None to leave the tokenizers out (pass tokenizer=... to from_single_file then)."""
    u, v, t1, t2 = cfg.unet, cfg.vae, cfg.te1, cfg.te2
    unet = {"_class_name": "UNet2DConditionModel", **diffusers_unet_config(u)}
    vae = {"_class_name": "AutoencoderKL", "in_channels": v.in_channels, "out_channels": v.in_channels,
           "block_out_channels": [v.ch * m for m in v.ch_mult], "layers_per_block": v.num_res_blocks,
           "down_block_types": ["DownEncoderBlock2D"] * len(v.ch_mult),
           "up_block_types": ["UpDecoderBlock2D"] * len(v.ch_mult), "latent_channels": v.z_channels,
           "norm_num_groups": v.num_groups, "act_fn": "silu", "sample_size": 1024, "scaling_factor": VAE_SCALE,
           "force_upcast": True}  # fp16 overflows in this VAE: diffusers decodes in fp32 when this is set

    def text(c, arch):  # eos_token_id 2 = transformers' legacy pooling by argmax(ids), as SDXL's configs have it
        return {"architectures": [arch], "model_type": "clip_text_model", "vocab_size": c.vocab_size,
                "hidden_size": c.width, "intermediate_size": c.mlp_dim, "num_hidden_layers": c.layers,
                "num_attention_heads": c.width // c.head_dim, "max_position_embeddings": c.n_ctx,
                "hidden_act": c.act, "layer_norm_eps": 1e-5, "projection_dim": c.proj_dim or c.width,
                "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "attention_dropout": 0.0, "dropout": 0.0}
    scheduler = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": beta_start,
                 "beta_end": beta_end, "beta_schedule": "scaled_linear", "rescale_betas_zero_snr": bool(zsnr),
                 "prediction_type": "v_prediction" if prediction == "v" else "epsilon",
                 "timestep_spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": True, "clip_sample": False}
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
             "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    configs = {"model_index.json": index, "scheduler/scheduler_config.json": scheduler, "unet/config.json": unet,
               "vae/config.json": vae, "text_encoder/config.json": text(t1, "CLIPTextModel"),
               "text_encoder_2/config.json": text(t2, "CLIPTextModelWithProjection")}
    if tokenizer_dirs is None:
        index["tokenizer"] = index["tokenizer_2"] = [None, None]
    else:
        for sub, src in zip(("tokenizer", "tokenizer_2"), tokenizer_dirs):
            for name in ("vocab.json", "merges.txt"):
                with open(os.path.join(src, name), "rb") as fh:
                    files.write_bytes(os.path.join(folder, sub, name), fh.read())
            with open(os.path.join(src, "vocab.json"), encoding="utf-8") as fh:
                id_to_token = {i: tok for tok, i in json.load(fh).items()}
            # CLIP-L pads with EOS; bigG pads with id 0 ("!" in the real vocabulary)
            pad = "<|endoftext|>" if sub == "tokenizer" else id_to_token[0]
            special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                       "pad_token": pad}
            configs[f"{sub}/special_tokens_map.json"] = special
            configs[f"{sub}/tokenizer_config.json"] = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                                      "do_lower_case": True, **special}
    for name, content in configs.items():
        files.write_json(os.path.join(folder, name), content, indent=2)


def export_metadata(recipe, title=None, conversion=None):
    """The metadata an export carries beside modelspec's: the sampling schedule and the recipe (training_config),
    from which card.py can rewrite the card from the file alone; `conversion` for transfer.py's apply."""
    meta = {"modelspec.title": title or f"SDXL {recipe['prediction']}-pred uptrain",
            "modelspec.date": time.strftime("%Y-%m-%d"),
            "noise_schedule": json.dumps({"beta_start": recipe["beta_start"], "beta_end": recipe["beta_end"],
                                          "beta_schedule": "scaled_linear", "zsnr": recipe["zsnr"],
                                          "timestep_spacing": "trailing", "num_train_timesteps": 1000}),
            "training_config": json.dumps(recipe)}
    if conversion is not None:
        meta["conversion"] = json.dumps(conversion)
    return meta


def write_export(out_dir, weights, recipe, cfg=None, dtype=None, tokenizer_dirs=None, ema=None, conversion=None,
                 ablation=None, title=None, model_file="model.safetensors", write=True):
    """model_file, model_ema.safetensors (when `ema` is given), diffusers/ and README.md in out_dir; returns their
    names. weights: an SDXL module, or {sgm key: tensor or checkpoint.Lazy} of the model `cfg` describes. recipe: the
    training_config dict. ema: a context manager that swaps the EMA weights into `weights` (optim.EMA.swapped()).
    write=False: a sharded run's other ranks, which only join the gathers."""
    v_pred, zsnr = recipe["prediction"] == "v", recipe["zsnr"]
    meta = export_metadata(recipe, title, conversion)
    written = []
    for name, swap in ((model_file, nullcontext()), ("model_ema.safetensors", ema)):
        if swap is None:
            continue
        path = os.path.join(out_dir, name)
        with swap:
            if isinstance(weights, Mapping):
                checkpoint.save_state(weights, cfg, path, v_pred, zsnr, meta, dtype, write)
            else:
                checkpoint.save_checkpoint(weights, path, v_pred, zsnr, meta, dtype, write)
        written.append(name)
    if not write:
        return written
    cfg = cfg or getattr(weights, "_orig_mod", weights).cfg
    write_diffusers_config(cfg, os.path.join(out_dir, "diffusers"), beta_end=recipe["beta_end"], zsnr=zsnr,
                           prediction=recipe["prediction"], tokenizer_dirs=tokenizer_dirs,
                           beta_start=recipe["beta_start"])
    written.append("diffusers/")
    card.write_card(out_dir, recipe, written, ablation, conversion, meta["modelspec.title"])
    written.append("README.md")
    print(f"exported {', '.join(os.path.join(out_dir, n) for n in written)}")
    return written


RECIPE_KEYS = ("prediction", "beta_start", "beta_end", "zsnr", "weighting", "k", "optimizer", "lr", "beta1", "beta2",
               "beta1_final", "beta2_final", "max_iters", "batch_size", "max_token_length")


def export_run(sdxl, out_dir, config, base, global_batch, ema=None, write=True):
    """train.py's export: write_export with the run's recipe (config: train.py's globals; ema: an optim.EMA or None)."""
    import torch
    import tokenizer as clip_tokenizer
    recipe = {key: config[key] for key in RECIPE_KEYS if key in config}
    recipe.update(base=base, global_batch=global_batch)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[config["export_dtype"]]
    tok_dir = clip_tokenizer.tokenizer_folder(config["tokenizer"]) if write else None
    return write_export(out_dir, sdxl, recipe, dtype=dtype, tokenizer_dirs=(tok_dir, tok_dir),
                        ema=ema and ema.swapped(), write=write)
