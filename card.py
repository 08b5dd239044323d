"""
The model card README.md beside every export: a v-prediction file read as epsilon gives noise or grey images, and
no tool reads the training schedule from the file (docs/sdxl_format.md §6), so it says, for each client, what to set
by hand. Its YAML head is Hugging Face's metadata as JSON scalars. It is rendered from the recipe that the file's
`training_config` metadata holds, so it can be rewritten from the file alone, e.g. once the ablation has been run:

    python sample_ablation.py --ckpt=out/vpred/model.safetensors --out=out/vpred/ablation.png
    python card.py --out_dir=out/vpred --ablation=out/vpred/ablation.json
"""
import json
import math
import os

import configurator
import files
from configurator import UserError, UserFileNotFound

# -----------------------------------------------------------------------------
out_dir = ""  # an export folder (model.safetensors + diffusers/): its README.md is rewritten
model = "model.safetensors"  # the exported file in out_dir whose metadata the card is rendered from
ablation = ""  # sample_ablation.py's JSON for this model: its panels go into the card
# -----------------------------------------------------------------------------

# licenses of the bases we know; any other base gets no license line (its own terms apply, the card says so)
_LICENSES = {"stabilityai/stable-diffusion-xl-base-1.0": "openrail++"}
_TAGS = ("stable-diffusion-xl", "text-to-image", "v-prediction", "zero-terminal-snr")
_SAMPLER_PHI = 0.7  # CFG rescale (Lin et al. 2023 §3.4), as the previews and sample_ablation.py use


def _num(x):
    return f"{x:g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _weighting(recipe):
    w, k = recipe.get("weighting"), recipe.get("k")
    return {"sigmoid": f"sigmoid(k - logSNR_t) on the v-MSE, k = {_num(k)}",
            "kg_sigmoid": f"Kingma & Gao's sigmoid weighting carried into v-space, k = {_num(k)}",
            "min_snr": "Min-SNR", "none": "none (plain v-MSE)"}.get(w, str(w))


def ablation_summary(result):
    """From sample_ablation.py's JSON: the mean x0 error over t-bins of each panel, keyed by (beta_end, zsnr,
    prediction), and the held-out set it was measured on. None when the JSON holds no error table."""
    quant = result.get("quant")
    if not quant:
        return None
    panels = {}
    for p in result.get("panels", []):
        errs = [e for e in quant["recon"].get(p["label"], [])
                if e is not None and not (isinstance(e, float) and math.isnan(e))]
        if errs:
            panels[(float(p["beta_end"]), bool(p["zsnr"]), p["prediction"])] = (p["label"], sum(errs) / len(errs))
    return {"panels": panels, "n": quant.get("n"), "dataset": quant.get("dataset"),
            "ckpt": os.path.basename(str(result.get("ckpt_path", "")))}


def _cost_text(recipe, ablation, model_file):
    """What sampling on the UIs' 0.012 grid costs: the ablation's numbers, or how to measure them."""
    be, zsnr = recipe.get("beta_end"), bool(recipe.get("zsnr"))
    measure = (f"`python sample_ablation.py --ckpt={model_file} --out=ablation.png` measures it (panel 3 is 0.012 "
               f"read as v; add the panel `(0.012, True, 'v')` for the UIs' exact setting), and "
               f"`python card.py --out_dir=. --ablation=ablation.json` writes its numbers into this card.")
    if ablation is None:
        return f"Not measured for this model yet: {measure}"
    p = ablation["panels"]
    train, ui, ui_z = p.get((float(be), zsnr, "v")), p.get((0.012, False, "v")), p.get((0.012, True, "v"))
    if train is None or (ui is None and ui_z is None):
        return f"The ablation given has no panel for the training schedule and for 0.012: {measure}"
    rows = ["| sampler schedule (output read as v) | x0 error, mean over 10 t-bins |", "|---|---|",
            f"| {train[0]} (the training schedule) | {train[1]:.4f} |"]
    for other in (ui, ui_z):
        if other is not None:
            rows.append(f"| {other[0]} | {other[1]:.4f} ({other[1] / train[1]:.2f}x) |")
    where = f"{ablation['n']} held-out latents ({ablation['dataset']})"
    return (f"Measured by `sample_ablation.py` on {where}, checkpoint `{ablation['ckpt']}`: the x0 reconstruction "
            f"error of the model's output under each schedule (lower is better).\n\n" + "\n".join(rows))


def _usage(model_file, bs, be, zsnr, recipe, ablation, patterns):
    """The card's how-to: the file, the sampler settings, each client, the cost of 0.012, the upload."""
    return ["", f"`{model_file}` is a single-file checkpoint in the sgm layout with the empty marker keys `v_pred` "
            "and `ztsnr`, and metadata `noise_schedule` and `training_config`.",
            "", "## Sampler settings", "", "| setting | value |", "|---|---|",
            "| prediction type | `v_prediction` |",
            f"| zero terminal SNR | {'on: `rescale_betas_zero_snr=True`' if zsnr else 'off'} |",
            f"| betas | scaled_linear {_num(bs)} -> {_num(be)} (`beta_end={_num(be)}`; the UIs use 0.012, see below) |",
            "| timestep spacing | `trailing` (the first step is t = 999, pure noise) |",
            f"| CFG | guidance ~5 with CFG rescale `guidance_rescale={_SAMPLER_PHI}` |",
            "", "## diffusers", "",
            "diffusers ignores the marker keys: load the file with the `diffusers/` config folder beside it, whose "
            f"scheduler is DDIM with `prediction_type=\"v_prediction\"`, `beta_end={_num(be)}`, "
            f"`rescale_betas_zero_snr={zsnr}` and `timestep_spacing=\"trailing\"`:", "", "```python",
            "import torch", "from diffusers import StableDiffusionXLPipeline", "",
            f"pipe = StableDiffusionXLPipeline.from_single_file(\"{model_file}\", config=\"diffusers\",",
            "                                                  local_files_only=True, torch_dtype=torch.float16)",
            "pipe = pipe.to(\"cuda\")",
            f"image = pipe(\"a photo of a cat\", guidance_scale=5.0, guidance_rescale={_SAMPLER_PHI}, "
            "num_inference_steps=25).images[0]", "```", "",
            "(From the Hub: `hf download OWNER/NAME --local-dir NAME`, then run this inside `NAME`.)", "",
            "## ComfyUI", "",
            "*Load Checkpoint* reads the `v_pred` and `ztsnr` keys and samples v-prediction with zero terminal SNR. "
            "Where a loader drops them, add *ModelSamplingDiscrete* with sampling `v_prediction` and `zsnr` on. Add "
            f"*RescaleCFG* (multiplier {_SAMPLER_PHI}) before the sampler, and use the `simple` scheduler, which "
            "starts at the last timestep like trailing spacing.", "",
            "## Forge, reForge and AUTOMATIC1111", "",
            "Forge and reForge read both marker keys when the checkpoint loads: v-prediction and zero terminal SNR "
            "are on with nothing to set. AUTOMATIC1111 reads `v_pred` (it picks its SDXL v-prediction config) but "
            "not `ztsnr`: set Settings -> Sampler parameters -> *Noise schedule for sampling* to "
            f"*Zero Terminal SNR*. Use CFG rescale {_SAMPLER_PHI} where the UI or an extension offers it.", "",
            "## InvokeAI", "",
            "InvokeAI does not read the marker keys: after installing the model, set its *Prediction Type* to "
            f"`v_prediction` by hand in the Model Manager, and *CFG Rescale Multiplier* to {_SAMPLER_PHI}. It does "
            "not take zero terminal SNR from the file either; without it, it samples v on 0.012 with no rescale "
            "(panel 3 below).", "",
            "## What sampling at beta_end 0.012 costs", "",
            f"The UIs rebuild SDXL's pretrain schedule (betas 0.00085 -> 0.012) whatever the file holds; "
            f"this model was trained on {_num(be)}. {_cost_text(recipe, ablation, model_file)}", "",
            "## Upload", "", "From this folder, to the Hub repository OWNER/NAME:", "", "```bash",
            f"hf upload OWNER/NAME . . {' '.join(f'--include {p}' for p in patterns)}",
            "# huggingface_hub < 1.0: the same with huggingface-cli and the patterns after one --include",
            f"huggingface-cli upload OWNER/NAME . . --include {' '.join(patterns)}", "```", ""]


def render(recipe, files_written=("model.safetensors", "diffusers/"), ablation=None, conversion=None, title=None):
    """The card's text. recipe: the training_config dict; conversion: transfer.py --mode=apply's {'base', 'delta',
    'kind', 'strength'} (base_model is then that base); ablation: ablation_summary() or None."""
    files_written = list(files_written)
    model_file = files_written[0]
    patterns = [f'"{f}*"' if f.endswith("/") else f'"{f}"' for f in files_written + ["README.md"]]
    # base_model: hf:OWNER/NAME/FILE -> the Hub repo OWNER/NAME; a path -> its file name (and no repo)
    base_spec = str((conversion["base"] if conversion else recipe.get("base")) or "")
    if base_spec.startswith("hf:") and base_spec.count("/") >= 2:
        name = repo = "/".join(base_spec[3:].split("/")[:2])
    else:
        name, repo = os.path.basename(base_spec) or None, None
    license_ = _LICENSES.get(repo)
    meta = [("base_model", name), ("base_model_relation", "merge" if conversion else "finetune"),
            ("license", license_), ("library_name", "diffusers"), ("pipeline_tag", "text-to-image")]
    yaml = ["---"] + [f"{k}: {json.dumps(v)}" for k, v in meta if v] + ["tags:"] + [f"- {t}" for t in _TAGS] + ["---"]
    be, bs, zsnr = recipe.get("beta_end", 0.024), recipe.get("beta_start", 0.00085), bool(recipe.get("zsnr", True))
    title = title or ("SDXL converted to v-prediction" if conversion else "SDXL uptrained to v-prediction")
    out = yaml + ["", f"# {title}", ""]
    if conversion:
        out += [f"`{model_file}` was not trained: it is `{conversion['base']}` plus the v-prediction conversion "
                f"`{conversion['delta']}` ({conversion['kind']}) at strength {_num(conversion['strength'])}, made by "
                f"`transfer.py --mode=apply`. The conversion is the weight change of an uptrain (below) of its own "
                f"epsilon start; whether it carries over to this base is a measurement, not a given: "
                f"`sample_ablation.py` shows whether the model predicts v (low x0 error in panel 1) on this base.",
                ""]
    else:
        out += [f"`{model_file}` is an SDXL checkpoint uptrained from epsilon- to **v-prediction** on a "
                f"zero-terminal-SNR noise schedule (Lin et al. 2023, arXiv 2305.08891).", ""]
    out += ["It predicts v = alpha eps - sigma x. Sampled as epsilon (the SDXL default) it gives noise or grey "
            "images: use the settings below.", "", "## What it is", "", "| | |", "|---|---|",
            f"| prediction | {recipe.get('prediction', 'v')} |",
            f"| training schedule | scaled-linear betas {_num(bs)} -> {_num(be)}"
            f"{', rescaled to zero terminal SNR' if zsnr else ''}, 1000 steps |",
            f"| loss weighting | {_weighting(recipe)} |"]
    if "optimizer" in recipe:
        betas = (f", betas ({_num(recipe.get('beta1'))}, {_num(recipe.get('beta2'))}) -> "
                 f"({_num(recipe.get('beta1_final'))}, {_num(recipe.get('beta2_final'))})") if "beta1" in recipe else ""
        out.append(f"| optimizer | {recipe['optimizer']}, lr {_num(recipe.get('lr'))}{betas} |")
    if "max_iters" in recipe:
        batch = recipe.get("global_batch", recipe.get("batch_size"))
        out.append(f"| steps | {recipe['max_iters']} at global batch {batch} |")
    if recipe.get("base"):
        out.append(f"| {'uptrained from' if conversion else 'base'} | `{recipe['base']}` |")
    if "max_token_length" in recipe:
        out.append(f"| prompt length | {recipe['max_token_length']} tokens (chunks of 75, each as 77 positions, "
                   f"as the UIs encode long prompts) |")
    out.append(f"| files | {', '.join(f'`{f}`' for f in files_written)} |")
    out += _usage(model_file, bs, be, zsnr, recipe, ablation, patterns)
    if not license_:
        out += [f"License: the base's (`{name}`) terms apply; add a `license:` line above before sharing.", ""]
    return "\n".join(out)


def read_ablation(path):
    """ablation_summary of a sample_ablation.py JSON file; bad input is one line."""
    if not os.path.isfile(path):
        raise UserFileNotFound(f"--ablation={path}: no such file (sample_ablation.py writes FILE.json beside FILE.png)")
    try:
        with open(path, encoding="utf-8") as f:
            return ablation_summary(json.load(f))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"--ablation={path}: not a sample_ablation.py result ({type(e).__name__}: {e})") from None


def write_card(out_dir, recipe, files_written=("model.safetensors", "diffusers/"), ablation=None, conversion=None,
               title=None):
    """out_dir/README.md, atomically (files.write_text). Returns its path."""
    path = os.path.join(out_dir, "README.md")
    files.write_text(path, render(recipe, tuple(files_written), ablation, conversion, title))
    return path


def card_from_export(folder, model="model.safetensors", ablation_path=""):
    """Rewrite folder/README.md from the exported file's metadata (and a sample_ablation.py JSON, when given)."""
    from checkpoint import CheckpointError, open_file
    path = os.path.join(folder, model)
    try:
        with open_file(path) as f:
            meta = f.metadata() or {}
    except CheckpointError as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if "training_config" not in meta:
        raise UserError(f"{path} has no training_config metadata: not an export of train.py or transfer.py")
    recipe = json.loads(meta["training_config"])
    conversion = json.loads(meta["conversion"]) if "conversion" in meta else None
    there = lambda name: os.path.exists(os.path.join(folder, name))
    written = [model] + [n for n in ("model_ema.safetensors", "diffusers") if n != model and there(n)]
    written = [n + "/" if n == "diffusers" else n for n in written]
    ablation = read_ablation(ablation_path) if ablation_path else None
    return write_card(folder, recipe, written, ablation, conversion, meta.get("modelspec.title"))


def main():
    configurator.configure(globals())
    if not out_dir:
        raise UserError("config error: set --out_dir=EXPORT_FOLDER")
    print(f"wrote {card_from_export(out_dir, model, ablation)}")


if __name__ == "__main__":
    main()
