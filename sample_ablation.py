"""
The sampling ablation of docs/maths.md §5: one labelled grid, rows = prompts (x seeds), columns = panels, each panel a
sampler schedule plus a reading of the model's output. The default four panels are the recipe's:
  1. training schedule (beta_end 0.024) + zero terminal SNR, output read as v
  2. 0.024 without zsnr, read as v
  3. pretrain schedule 0.012, read as v
  4. 0.012, read as eps (what an epsilon model expects)
Every panel of a row starts from the same noise (a per-seed generator), so columns differ only by the panel.
DDIM (eta=0) on trailing timesteps, CFG with rescale in the model's output space (Lin et al. 2023, arXiv
2305.08891 §3.3-3.4); the unconditional branch is zeroed context and pooled with the size embeddings kept.
Text encoders and VAE come from the same single-file checkpoint.

Next to the pictures, a quantitative ablation (--quant=True): on a fixed held-out set of latents, per t-bin (10 bins
of 100) the MSE of the model's output against the v target and the eps target (training schedule), and the x0
reconstruction error under each panel's schedule and reading. A v-uptrained model has low v-error at high t where
the eps reading fails; an eps model the reverse (docs/maths.md §6). Printed as a table and saved in the JSON.

Launch:
    python sample_ablation.py --ckpt=out/tiny/model.safetensors --out=out/tiny/ablation.png --steps=4   # CPU, tiny
    python sample_ablation.py --ckpt=out/vpred/model.safetensors --out=ablation.png                     # 1 GPU, SDXL
    python sample_ablation.py --ckpt=hf:stabilityai/stable-diffusion-xl-base-1.0/sd_xl_base_1.0.safetensors \\
        --out=base.png --panels="[(0.012, False, 'eps', 'SDXL base'), (0.012, False, 'v')]"               # other ablations
    python sample_ablation.py --help                                                                    # every key
Writes FILE.png and FILE.json (the exact settings, the checkpoint's markers, the quant table); an existing one is
replaced only with --overwrite=True, and a JSON this script did not write (train.py's run.json) never is.
"""
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext

import torch

import cache
import checkpoint
import configurator
import files
import data
import demo
import model
import objective
import schedule
import tokenizer as clip_tokenizer
from configurator import UserError, UserFileNotFound

# -----------------------------------------------------------------------------
ckpt = ""  # single-file sgm checkpoint: local .safetensors or hf:REPO/FILE
out = "ablation.png"  # grid PNG; the JSON with the exact settings goes beside it (same stem)
overwrite = False  # replace an existing --out PNG and the ablation JSON beside it (otherwise it refuses)
tokenizer = ""  # vocab.json + merges.txt folder (or one with tokenizer/ inside) or hf:REPO; '' = <ckpt dir>/diffusers if train.py exported it there, else hf:stabilityai/stable-diffusion-xl-base-1.0
prompts = ""  # file with one prompt per line, or 'p1|p2|...'; '' = the built-in prompts
max_token_length = 0  # 75 | 150 | 225: prompts as 1-3 chunks of 77 positions (docs/sdxl_format.md §8); 0 = the model's (its metadata)
seeds = [0]  # rows = prompts x seeds; every panel of a row starts from the same noise
panels = [(0.024, True, "v"), (0.024, False, "v"), (0.012, False, "v"), (0.012, False, "eps")]  # columns: (beta_end, zsnr, prediction v|eps[, label]); default = the four of docs/maths.md §5
steps = 25  # DDIM steps, trailing spacing: the first step is t=999
guidance = 5.0  # CFG scale; 1.0 = no unconditional branch
phi = 0.7  # CFG rescale (Lin et al. §3.4); 0 = plain CFG
height = 0  # image height in pixels; 0 = 1024 for an SDXL-sized UNet, 128 for a tiny one
width = 0  # image width in pixels; 0 = as height
batch_size = 4  # rows per UNet call (x2 with CFG)
device = ""  # '' = cuda if available, else cpu
dtype = ""  # autocast dtype: '' = bfloat16 on cuda, float32 on cpu (weights are loaded in float32)
quant = True  # also the per-t-bin error table on held-out latents
dataset_dir = ""  # held-out images (+ .txt captions) for the table, the first quant_n by path (= train.py's eval_items); '' = synthetic shapes
quant_n = 8  # held-out images
quant_seed = 1234  # noise of the table and seed of the synthetic images (train.py's synthetic set uses 0)
train_beta_end = 0.024  # the model's training schedule, for the v / eps targets of the table
train_zsnr = True  # training schedule rescaled to zero terminal SNR
# -----------------------------------------------------------------------------
_PROMPTS = ("a photo of a cat sitting on a windowsill, soft morning light",
            "a large red circle on a blue background, center",
            "a watercolor painting of a lighthouse on a cliff at dusk",
            "a black square on a white background, top left")
_NBINS = 10  # t-bins of the table: 10 bins of 100 steps
_SEED_MAX = 2 ** 64 - 1  # torch.Generator.manual_seed takes 64 bits


def panel_list(specs):
    """(beta_end, zsnr, prediction[, label]) tuples -> dicts with label, schedule and the sampler's abar."""
    out = []
    for spec in specs:
        if not isinstance(spec, (tuple, list)) or len(spec) not in (3, 4) or spec[2] not in ("v", "eps") or \
                not isinstance(spec[0], (int, float)) or not 0 < spec[0] < 1:
            raise UserError(f"config error: panel {spec!r} must be (beta_end in (0, 1), zsnr, prediction 'v' or 'eps'"
                            f"[, label])")
        beta_end, zsnr, pred = float(spec[0]), bool(spec[1]), str(spec[2])
        label = spec[3] if len(spec) > 3 else f"{beta_end:g}{' + zsnr' if zsnr else ''}, as {pred}"
        out.append({"label": label, "beta_end": beta_end, "zsnr": zsnr, "prediction": pred,
                    "abar": schedule.alphas_cumprod(beta_end, zsnr)})
    return out


def check_sampling(panel_dicts):
    """Fail before sampling: an eps reading on a zero-SNR schedule divides by alpha = 0 at t=999 (docs/maths.md §3)."""
    for p in panel_dicts:
        if p["prediction"] == "eps" and p["zsnr"]:
            raise UserError(f"panel {p['label']!r}: an eps reading on a zero-terminal-SNR schedule is undefined at "
                             f"t=999 (x0 = (z - sigma eps) / alpha, alpha = 0); use prediction 'v' or zsnr False")


def initial_noise(seeds, shape):
    """One CPU generator per seed -> (len(seeds), *shape) float32: same seed, same noise, on any device."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def encode_prompts(sdxl, tok, prompts, device, max_token_length=75):
    """Prompts -> (context (B, 77 n, ctx), pooled (B, P)) on device, fp32; te1 pads with EOS, te2 with 0 (SDXL).
    n = max_token_length / 75 chunks of 77 positions, pooled from the first (cache.encode_captions): use the
    setting the model was trained with, so previews and the ablation see the training layout."""
    t1, t2 = clip_tokenizer.tokenize(tok, list(prompts), max_token_length=max_token_length)
    context, pooled = cache.encode_captions(sdxl.encode_text, t1, t2, device)
    return context.to(device), pooled.to(device)


def _amp(device, amp_dtype):
    dev = torch.device(device).type
    if amp_dtype is None:
        amp_dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    return nullcontext() if amp_dtype == torch.float32 else torch.autocast(dev, dtype=amp_dtype)


@torch.no_grad()
def generate(sdxl, context, pooled, noise, abar, steps, prediction="v", guidance=5.0, phi=0.7, height=None,
             width=None, amp_dtype=None):
    """DDIM from `noise` (B, 4, h, w) with schedule.sample, then the VAE -> images (B, 3, H, W) in [-1, 1], fp32.
    height/width (pixels) go into the size embeddings as (H, W), crop (0, 0), target (H, W)."""
    f = 2 ** (len(sdxl.cfg.vae.ch_mult) - 1)
    H, W = height or noise.shape[-2] * f, width or noise.shape[-1] * f
    dev = noise.device
    time_ids = torch.tensor([[H, W, 0, 0, H, W]], dtype=torch.float32, device=dev).expand(noise.shape[0], 6)
    context, pooled = context.to(dev), pooled.to(dev)
    y = model.build_y(pooled, time_ids)
    amp = _amp(dev, amp_dtype)
    if guidance != 1.0:  # one call for both branches: (cond, uncond = zeroed text, same size embeddings)
        context2 = torch.cat([context, torch.zeros_like(context)])
        y2 = torch.cat([y, model.build_y(torch.zeros_like(pooled), time_ids)])

    def model_fn(z, t):
        with amp:
            if guidance == 1.0:
                return sdxl.unet(z, t, context, y).float()
            return sdxl.unet(torch.cat([z, z]), torch.cat([t, t]), context2, y2).float().chunk(2)

    z0 = schedule.sample(model_fn, noise, abar, steps, prediction, guidance, phi)
    with amp:  # one image at a time: the SDXL decoder at 1024^2 is memory-hungry
        imgs = [sdxl.vae.decode(z[None] / model.VAE_SCALE).float() for z in z0]
    return torch.cat(imgs).clamp(-1, 1)


def preview(sdxl, context, pooled, abar, size, seed, steps, prediction, guidance, phi, path=None):
    """train.py's preview grid: one row of the prompts (context, pooled) at size x size from a fixed seed, on the
    training schedule; written to path (None: every rank samples, only one writes)."""
    f = 2 ** (len(sdxl.cfg.vae.ch_mult) - 1)  # the VAE's downsampling factor (8 in SDXL)
    n, dev = context.shape[0], context.device
    noise = torch.randn(n, sdxl.cfg.unet.in_channels, size // f, size // f, generator=torch.Generator().manual_seed(seed))
    imgs = generate(sdxl, context, pooled, noise.to(dev), abar.to(dev), steps, prediction, guidance, phi, size, size)
    if path:
        save_grid(imgs, 1, n, path)
    return imgs


def render(sdxl, context, pooled, noise, panel_dicts, steps, guidance, phi, height, width, batch_size=4,
           amp_dtype=None):
    """Every panel on every row, from the SAME noise per row -> (R * C, 3, H, W), row-major (row r, panel c)."""
    R, C = noise.shape[0], len(panel_dicts)
    out = [[None] * C for _ in range(R)]
    for c, p in enumerate(panel_dicts):
        for i in range(0, R, batch_size):
            j = min(R, i + batch_size)
            t0 = time.time()
            imgs = generate(sdxl, context[i:j], pooled[i:j], noise[i:j], p["abar"], steps, p["prediction"],
                            guidance, phi, height, width, amp_dtype).cpu()
            for r in range(i, j):
                out[r][c] = imgs[r - i]
            print(f"panel {c + 1}/{C} '{p['label']}': rows {i}-{j - 1} in {time.time() - t0:.1f}s")
    return torch.stack([im for row in out for im in row])


def _wrap(draw, text, font, width_px, max_lines):
    lines = []
    for para in str(text).split("\n"):
        line = ""
        for word in para.split():
            cand = f"{line} {word}".strip()
            if line and draw.textlength(cand, font=font) > width_px:
                lines.append(line)
                line = word
            else:
                line = cand
        lines.append(line)
    return lines[:max_lines]


def save_grid(images, rows, cols, path, row_labels=None, col_labels=None):
    """images (rows * cols, 3, H, W) in [-1, 1], row-major -> one PNG with optional labels; atomic write."""
    from PIL import Image, ImageDraw, ImageFont
    images = images.detach().float().cpu()
    assert images.shape[0] == rows * cols, f"{images.shape[0]} images for a {rows}x{cols} grid"
    H, W = images.shape[-2:]
    try:
        font = ImageFont.load_default(size=max(10, W // 24))
    except TypeError:  # Pillow < 10.1: bitmap font, no size
        font = ImageFont.load_default()
    line_h = font.getbbox("Hg")[3] + 2
    left = max(120, W // 2) if row_labels else 0
    top = 3 * line_h + 6 if col_labels else 0
    grid = Image.new("RGB", (left + cols * W, top + rows * H), "white")
    draw = ImageDraw.Draw(grid)
    pix = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        grid.paste(Image.fromarray(pix[k]), (left + c * W, top + r * H))
    for c, label in enumerate(col_labels or []):
        for n, line in enumerate(_wrap(draw, label, font, W - 6, 3)):
            draw.text((left + c * W + 3, 3 + n * line_h), line, fill="black", font=font)
    for r, label in enumerate(row_labels or []):
        for n, line in enumerate(_wrap(draw, label, font, left - 6, max(1, H // line_h))):
            draw.text((3, top + r * H + 3 + n * line_h), line, fill="black", font=font)
    with files.atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return grid


# -----------------------------------------------------------------------------
# the quantitative ablation

def bin_timesteps(n, b, nbins=_NBINS, T=1000):
    """n fixed timesteps spread over bin b = [b T/nbins, (b+1) T/nbins), its last step first (t=999 in the last bin)."""
    w = T // nbins
    return torch.tensor([b * w + w - 1 - (i * w) // max(n, 1) % w for i in range(n)], dtype=torch.long)


def read_x0(out, z, t, abar, prediction):
    """x0_hat of a model output under a reading (schedule.ddim_step's final step); NaN where eps meets alpha = 0."""
    if prediction == "eps" and bool((abar.to(t.device)[t] == 0).any()):
        return torch.full_like(z, math.nan)
    return schedule.ddim_step(out, t, -1, z, abar, prediction)[1]


@torch.no_grad()
def quant_ablation(model_fn, x0, noise, panel_dicts, train_abar, nbins=_NBINS):
    """Per t-bin: MSE of model_fn's output vs the v and eps targets (z on the training schedule), and the x0
    reconstruction MSE under each panel (z on the panel's schedule, output read the panel's way).
    model_fn(z, t) -> output like z. Returns lists of nbins floats (NaN = undefined)."""
    T = len(train_abar)
    res = {"bins": [[b * T // nbins, (b + 1) * T // nbins - 1] for b in range(nbins)], "mse_v": [], "mse_eps": [],
           "recon": {p["label"]: [] for p in panel_dicts}, "n": int(x0.shape[0])}
    mse = lambda a, b: (a.double() - b.double()).pow(2).mean().item()
    # the training objective's noising and targets (objective.py), on the training schedule and on each panel's
    as_v, as_eps = objective.Objective(train_abar, "v"), objective.Objective(train_abar, "eps")
    for b in range(nbins):
        t = bin_timesteps(x0.shape[0], b, nbins, T).to(x0.device)
        outs = []  # the output depends on the schedule only, not on the reading: one call per schedule

        def output(abar):
            for a, z, o in outs:
                if torch.equal(a, abar):
                    return z, o
            z = objective.Objective(abar).noised(x0, noise, t)
            outs.append((abar, z, model_fn(z, t).to(x0.dtype)))
            return outs[-1][1:]

        _, o = output(train_abar)
        res["mse_v"].append(mse(o, as_v.target(x0, noise, t)))
        res["mse_eps"].append(mse(o, as_eps.target(x0, noise, t)))
        for p in panel_dicts:
            z, o = output(p["abar"])
            res["recon"][p["label"]].append(mse(read_x0(o, z, t, p["abar"], p["prediction"]), x0))
    return res


def format_table(res):
    fmt = lambda v: "-" if math.isnan(v) else f"{v:.4f}"
    labels = list(res["recon"])
    head = ["t", "mse vs v", "mse vs eps"] + [f"x0 err: {l}" for l in labels]
    rows = [[f"{lo}-{hi}", fmt(res["mse_v"][b]), fmt(res["mse_eps"][b])] + [fmt(res["recon"][l][b]) for l in labels]
            for b, (lo, hi) in enumerate(res["bins"])]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head] + rows)


def held_out_items(folder, n, H, W, seed):
    """The first n usable images of folder (by path) planned at H x W; a UserError if there is none. Called
    before any sampling, so a folder without images costs nothing."""
    items = data.scan_dataset(folder, buckets=[(H, W)], seed=seed, min_pixels=0)[:n]
    if not items:
        raise UserError(f"--dataset_dir={folder}: no usable images for the error table (see the lines above)")
    return items


def held_out(sdxl, tok, items, n, H, W, seed, device, max_token_length=75):
    """(latents x0 = VAE mean * scale, context, pooled, time_ids) of items (held_out_items), or of n synthetic
    shapes at H x W (seed != train.py's 0, so not its training images) when items is None."""
    tmp = tempfile.mkdtemp(prefix="quant_shapes_") if items is None else None
    try:  # (a stop signal raises SystemExit in here too: the synthetic folder is removed either way)
        if tmp:
            demo.make_synthetic_dataset(tmp, n=n, seed=seed)  # demo.py's sizes, resized to H x W like training
            items = held_out_items(tmp, n, H, W, seed)
        mean = torch.cat([cache.encode_images(sdxl.vae, items[i:i + 4], device) for i in range(0, len(items), 4)])
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    context, pooled = encode_prompts(sdxl, tok, [it.caption for it in items], device, max_token_length)
    time_ids = torch.tensor([[*it.orig_hw, *it.crop_tl, *it.bucket] for it in items], dtype=torch.float32)
    return mean.to(device) * model.VAE_SCALE, context, pooled, time_ids.to(device)


def unet_fn(sdxl, context, pooled, time_ids, batch_size=4, amp_dtype=None):
    """model_fn(z, t) for the table: the conditional UNet output, in chunks of batch_size."""
    y = model.build_y(pooled, time_ids)
    amp = _amp(context.device, amp_dtype)

    def fn(z, t):
        with amp:
            return torch.cat([sdxl.unet(z[i:i + batch_size], t[i:i + batch_size], context[i:i + batch_size],
                                        y[i:i + batch_size]).float() for i in range(0, z.shape[0], batch_size)])
    return fn


# -----------------------------------------------------------------------------

def read_prompts(spec):
    """'' -> the built-in prompts; a file -> its non-empty lines; else 'p1|p2|...'. Something that looks like a
    path (a text-file suffix, or a slash and no space) and does not exist is an error, not a prompt."""
    if not spec:
        return list(_PROMPTS)
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8", errors="replace") as f:
            prompts = [line.strip() for line in f if line.strip()]
    elif spec.lower().endswith((".txt", ".csv", ".json", ".jsonl", ".md")) or ("/" in spec and " " not in spec):
        raise UserFileNotFound(f"prompts file {spec} not found (--prompts is a file with one prompt per line, "
                               f"or 'prompt 1|prompt 2|...')")
    else:
        prompts = [p.strip() for p in spec.split("|") if p.strip()]
    if not prompts:
        raise UserError(f"--prompts={spec!r} holds no prompt")
    return prompts


def check_outputs(png, overwrite):
    """The JSON path beside png; a UserError, before anything is loaded, if --out cannot be a grid PNG or if
    writing would replace a file without --overwrite=True. A JSON there that this script did not write (train.py's
    run.json, say) is never replaced."""
    if os.path.splitext(png)[1].lower() != ".png":
        raise UserError(f"config error: --out={png!r} must name a .png file (the grid; its JSON goes beside it)")
    if os.path.isdir(png):
        raise UserError(f"config error: --out={png!r} is a folder; name the grid's file, e.g. {png.rstrip('/')}/ablation.png")
    jpath = os.path.splitext(png)[0] + ".json"
    if os.path.exists(jpath) and not _is_ablation_json(jpath):
        raise UserError(f"--out={png!r}: its JSON would replace {jpath}, which sample_ablation.py did not write; "
                        f"pick another --out")
    there = [p for p in (png, jpath) if os.path.exists(p)]
    if there and not overwrite:
        raise UserError(f"--out={png!r}: {' and '.join(there)} exist already; pass --overwrite=True to replace "
                        f"{'them' if len(there) > 1 else 'it'}, or pick another --out")
    return jpath


def _is_ablation_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and {"config", "panels", "ckpt_markers", "timesteps"} <= obj.keys()


def write_json(obj, path):
    clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # strict JSON: NaN -> null
    walk = lambda o: {k: walk(v) for k, v in o.items()} if isinstance(o, dict) else \
        [walk(v) for v in o] if isinstance(o, (list, tuple)) else clean(o)
    files.write_json(path, walk(obj), indent=1, default=str)


def trained_token_length(meta):
    """The prompt length an export of train.py was trained with (its training_config metadata); SDXL's 75 for a
    file without one, or with one this code cannot read."""
    try:
        n = json.loads(meta.get("training_config") or "{}").get("max_token_length", 75)
    except (ValueError, AttributeError):
        return 75
    return n if n in clip_tokenizer.MAX_TOKEN_LENGTHS else 75


def check_config(config):
    """Everything the config shows, before anything is loaded."""
    configurator.check(config, choices={"dtype": ("", "float32", "bfloat16", "float16"),
                                        "max_token_length": (0, *clip_tokenizer.MAX_TOKEN_LENGTHS)},
                       at_least={"height": 0, "width": 0, "batch_size": 1, "quant_n": 1},
                       within={"steps": (1, 1000), "guidance": (-math.inf, math.inf), "phi": (0, 1),
                               "train_beta_end": (0, 1), "quant_seed": (0, _SEED_MAX)})
    if not ckpt:
        raise UserError("config error: set --ckpt=PATH.safetensors or --ckpt=hf:OWNER/NAME/FILE")
    if device:
        configurator.check_device(device)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= _SEED_MAX for s in seeds):
        raise UserError(f"config error: --seeds={seeds!r} must be a non-empty list of integers in [0, 2**64 - 1] "
                        f"(torch's generator seeds)")
    if not panels:
        raise UserError("config error: --panels is empty: give at least one (beta_end, zsnr, prediction) panel")
    if quant and dataset_dir and not os.path.isdir(dataset_dir):
        raise UserFileNotFound(f"--dataset_dir={dataset_dir!r} is not a folder")


def main():
    configurator.on_stop_signals()  # Ctrl-C, SIGTERM, SIGHUP: one line, temp files removed, exit 128 + signal
    config = configurator.configure(globals())
    check_config(config)
    t_start = time.time()
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = getattr(torch, dtype) if dtype else None
    pds = panel_list(panels)
    check_sampling(pds)
    plist = read_prompts(prompts)
    jpath = check_outputs(out, overwrite)
    files.make_dir(os.path.dirname(os.path.abspath(out)), "out")  # now, not after the sampling
    path = checkpoint.fetch(ckpt)
    try:
        cfg = checkpoint.read_config(path)  # the header only: sizes are checked before the weights are read
        f = 2 ** (len(cfg.vae.ch_mult) - 1)
        m = f * 2 ** (len(cfg.unet.channel_mult) - 1)
        H = height or (128 if cfg.unet.model_channels < 320 else 1024)
        W = width or H
        if H % m or W % m:
            raise UserError(f"config error: height and width must be multiples of {m} for this model, got {H}x{W}")
        # the vocabulary and the held-out images, before the weights are read and anything is sampled
        tok_spec = tokenizer
        if not tok_spec:
            exported = os.path.join(os.path.dirname(os.path.abspath(path)), "diffusers")
            has = os.path.isfile(os.path.join(exported, "tokenizer", "vocab.json"))
            tok_spec = exported if has else "hf:stabilityai/stable-diffusion-xl-base-1.0"
        tok = clip_tokenizer.load_tokenizer(tok_spec)
        n_ids = min(cfg.te1.vocab_size, cfg.te2.vocab_size)
        if tok.vocab_size > n_ids:
            raise UserError(f"tokenizer {tok_spec}: {tok.vocab_size} tokens, but the text encoders of {path} embed "
                            f"{n_ids}: use the vocabulary the model was trained with (--tokenizer)")
        quant_items = held_out_items(dataset_dir, quant_n, H, W, quant_seed) if quant and dataset_dir else None
        sdxl = checkpoint.load_checkpoint(path, device=dev, dtype=torch.float32).eval()
    except checkpoint.CheckpointError as e:
        raise UserError(f"cannot load {path}: {e}") from None
    rows = [(p, s) for p in plist for s in seeds]
    n_tokens = max_token_length or trained_token_length(sdxl.metadata)
    print(f"{path}: v_pred marker {sdxl.v_pred}, ztsnr marker {sdxl.ztsnr}; {len(rows)} rows x {len(pds)} panels, "
          f"{H}x{W}, {steps} steps, guidance {guidance}, phi {phi}, prompts of {n_tokens} tokens, on {dev}")
    noise = initial_noise([s for _, s in rows], (sdxl.cfg.unet.in_channels, H // f, W // f)).to(dev)
    context, pooled = encode_prompts(sdxl, tok, [p for p, _ in rows], dev, n_tokens)
    images = render(sdxl, context, pooled, noise, pds, steps, guidance, phi, H, W, batch_size, amp_dtype)
    row_labels = [f"{p} (seed {s})" for p, s in rows]
    save_grid(images, len(rows), len(pds), out, row_labels, [p["label"] for p in pds])
    print(f"wrote {out}")
    meta = sdxl.metadata
    result = {"config": config, "ckpt_path": path, "tokenizer": tok_spec, "device": dev, "height": H, "width": W,
              "max_token_length": n_tokens,
              "rows": [{"prompt": p, "seed": s} for p, s in rows], "torch": torch.__version__,
              "timesteps": schedule.trailing_timesteps(steps).tolist(),
              "panels": [{k: v for k, v in p.items() if k != "abar"} for p in pds],
              "ckpt_markers": {"v_pred": sdxl.v_pred, "ztsnr": sdxl.ztsnr,
                               "prediction_type": meta.get("modelspec.prediction_type"),
                               "noise_schedule": meta.get("noise_schedule")}}
    if quant:
        print(f"error table: encoding {len(quant_items) if quant_items else quant_n} held-out images")
        x0, qctx, qpool, qids = held_out(sdxl, tok, quant_items, quant_n, H, W, quant_seed, dev, n_tokens)
        qnoise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(quant_seed)).to(dev)
        train_abar = schedule.alphas_cumprod(train_beta_end, train_zsnr)
        res = quant_ablation(unet_fn(sdxl, qctx, qpool, qids, batch_size, amp_dtype), x0, qnoise, pds, train_abar)
        res["train_schedule"] = {"beta_end": train_beta_end, "zsnr": train_zsnr}
        res["dataset"] = dataset_dir or f"synthetic shapes, seed {quant_seed}"
        print(f"per-t-bin error on {x0.shape[0]} held-out latents ({res['dataset']}; '-' = undefined):")
        print(format_table(res))
        result["quant"] = res
    result["seconds"] = round(time.time() - t_start, 2)
    write_json(result, jpath)
    print(f"wrote {jpath}")


if __name__ == "__main__":
    main()
