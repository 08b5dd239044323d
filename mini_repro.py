"""
The miniature reproduction: the whole uptrain (docs/maths.md §1, §5, §6) on a small SDXL-topology model, offline,
on 2 CPU cores in about 30 minutes. It uses the real pipeline (train.py, sample_ablation.py) unchanged.

    python mini_repro.py                              # writes out/mini/ and copies the results to assets/mini/
    python mini_repro.py --out=out/mini2 --assets=    # another folder, no copy to assets/
    python mini_repro.py --help                       # every key

Stages, each timed and printed:
  1. data     synthetic 64x64 captioned shapes (demo.make_synthetic_dataset). The first eval_items by path are held
              out everywhere: VAE PSNR, train.py's per-t-bin eval, sample_ablation's table.
  2. vae      train a small SDXL-topology VAE (L1 + L2 + small KL, AdamW), then fold a per-channel affine into
              quant_conv / post_quant_conv so that mean * VAE_SCALE is zero-mean, unit-std: the pipeline's fixed
              SDXL scale 0.13025 then holds for this VAE, bit-for-bit the same decoder output.
  3. start    start checkpoint (trained VAE, random frozen text encoders, random UNet) + BPE vocabulary
  4. eps      python train.py config/mini_eps.py      the "SDXL base": epsilon, beta_end 0.012, no zsnr
  5. vpred    python train.py config/mini_vpred.py    the recipe: v, 0.024 + zsnr, sigmoid k=5, AdamW8bit,
              after a 1-step run at lr 1e-30 (no weight changes) that evaluates the eps model read as v (step 0 of the progress curve)
  6. ablation sample_ablation.py on both exports: four-panel grids + per-t-bin tables on the held-out images
  7. report   progress curve PNG (PIL), results.json, summary table; PNGs + JSON copied to assets/mini/
"""
import os
import sys

# before torch starts its thread pool: 2 threads, and threads that sleep rather than spin while they wait. Measured
# here: with another job on the 2 cores, spinning OpenMP threads made a VAE step 5-8x slower, sleeping ones 2x.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = os.path.dirname(os.path.abspath(__file__))

import json
import math
import shutil
import subprocess
import time

import torch
from PIL import Image, ImageDraw, ImageFont

import checkpoint
import configurator
import data
import demo
import files
import model

# -----------------------------------------------------------------------------
out = "out/mini"  # everything the run makes: images/, tokenizer/, start.safetensors, eps/, v0/, vpred/, ablation_*
assets = "assets/mini"  # small PNGs + results.json are copied here ('' = no copy)
n_images = 320  # synthetic images, 64x64
eval_items = 16  # held out everywhere (the first by path); = eval_items of both configs and the table's quant_n
vae_ch = 64  # VAE width: with GroupNorm's fixed 32 groups, 32 channels would be 1 per group = instance norm,
#              which erases each image's absolute colour (a flat latent offset barely changes the decoded colour)
vae_ch_mult = (1, 1, 2)  # 3 levels = 4x downsampling: 64x64 images -> 16x16x4 latents (8x with 4 levels costs
#                          the same per pixel but 128x128 images are 4x the pixels: too slow for 2 CPU cores)
vae_steps = 900  # optimizer steps of batch vae_batch (~0.5 s each on 2 free cores)
vae_batch = 8
vae_lr = 2e-3  # peak; linear warmup over 50 steps, cosine down to 10%
fg_weight = 10.0  # loss weight of the shape's pixels (~5% of the image): without it shapes decode as wrong-colour blobs
kl_weight = 1e-5  # per latent element, next to L1 + L2 per pixel: keeps logvar finite, barely shapes the latents
unet_ch = 64  # UNet width: 64 -> 2 channels per GroupNorm group at level 0 (see vae_ch)
unet_mult = (1, 2, 2)  # 64, 128, 128 channels on 16, 8, 4 latent pixels
sample_steps = 25  # DDIM steps of the ablation grids
eps_iters = 0  # 0 = config/mini_eps.py's max_iters; N overrides max_iters and ramp_iters (quick smoke runs)
v_iters = 0  # 0 = config/mini_vpred.py's max_iters; N overrides max_iters and ramp_iters
seed = 0
# -----------------------------------------------------------------------------


WALLS, OPEN = {}, []  # stage -> wall seconds; the running stage as [(name, start)]


def stage(name):
    """Close the running stage (print and record its wall time), open the next one (None: just close)."""
    if OPEN:
        prev, t0 = OPEN.pop()
        WALLS[prev] = round(time.time() - t0, 1)
        print(f"=== {prev}: {WALLS[prev]:.0f}s", flush=True)
    if name:
        OPEN.append((name, time.time()))
        print(f"=== {name}", flush=True)


def run(*args):
    """A repo script in a subprocess, its output streamed; a failure stops the reproduction."""
    cmd = [sys.executable, *args]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def to_pil(x, scale=1):
    """(3, H, W) in [-1, 1] -> PIL image, upscaled with nearest so that 64x64 pixels stay visible."""
    im = Image.fromarray(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST)


def train_vae(vae, train):
    """L1 + L2 on reconstructions of a posterior sample + kl_weight * KL, AdamW, warmup then cosine to 10%."""
    for m in vae.modules():  # residual branches start at zero (every block the identity): much faster from scratch
        if isinstance(m, (model.VAEResBlock, model.VAEAttention)):
            last = m.conv2 if isinstance(m, model.VAEResBlock) else m.proj_out
            torch.nn.init.zeros_(last.weight), torch.nn.init.zeros_(last.bias)
    with torch.no_grad():  # posterior std starts at e^-4, not 1: unit noise would drown the mean while it is small
        vae.quant_conv.bias[vae.cfg.z_channels:] = -8.0
    opt = torch.optim.AdamW(vae.parameters(), lr=vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    t0 = time.time()
    for step in range(vae_steps):
        lr = vae_lr * min(1.0, (step + 1) / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / vae_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        xb = train[torch.randint(0, len(train), (vae_batch,))]
        xb = torch.where(torch.rand(vae_batch, 1, 1, 1) < 0.5, xb.flip(-1), xb)  # horizontal flips
        mean, logvar = vae.encode(xb)
        rec = vae.decode(mean + torch.randn_like(mean) * (0.5 * logvar).exp())
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        # the shape is ~5% of the pixels: pixels off the background colour (the median) weigh fg_weight x
        fg = ((xb - xb.median(dim=-1).values.median(dim=-1).values[..., None, None]).abs().sum(1, keepdim=True) > 0.1)
        w = 1.0 + (fg_weight - 1.0) * fg.float()
        loss = (w * ((rec - xb).abs() + (rec - xb).pow(2))).mean() + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"vae step {step + 1}/{vae_steps}: loss {loss.item():.4f}, kl {kl.item():.2f}, lr {lr:.2e}, "
                  f"{time.time() - t0:.0f}s", flush=True)
    return vae.eval()


@torch.no_grad()
def encode(vae, x):
    return torch.cat([vae.encode(x[i:i + 32])[0] for i in range(0, len(x), 32)])  # the posterior mean


@torch.no_grad()
def normalise_latents_(vae, mean):
    """Fold z' = a (z - mu), a = 1 / (std * VAE_SCALE) per channel, into quant_conv (mean half; logvar + 2 log a)
    and post_quant_conv (W / a, b + W mu): decoded images are unchanged, and z' * VAE_SCALE, what the UNet sees,
    is zero-mean and unit-std per channel on `mean`'s images. -> (mu, std) of the raw latents."""
    mu, sd = mean.mean(dim=(0, 2, 3)), mean.std(dim=(0, 2, 3))
    a, C = 1.0 / (sd * model.VAE_SCALE), mu.numel()
    q, pq = vae.quant_conv, vae.post_quant_conv
    q.weight[:C] *= a.view(-1, 1, 1, 1)
    q.bias[:C] = a * (q.bias[:C] - mu)
    q.bias[C:] += 2 * a.log()
    pq.bias += pq.weight[:, :, 0, 0] @ mu
    pq.weight /= a.view(1, -1, 1, 1)
    return mu, sd


def draw_curve(path, curve, bins=(0, 2, 5, 7, 9), W=560, H=340, L=60, R=130, T=30, B=40):
    """Held-out v-MSE per t-bin (log scale) against uptrain step, one line per bin; PIL only."""
    im = Image.new("RGB", (W, H), "white")
    d, font = ImageDraw.Draw(im), ImageFont.load_default()
    xs = [c["iter"] for c in curve]
    ys = [math.log10(max(c["mse_bins"][b], 1e-6)) for c in curve for b in bins]
    lo, hi = math.floor(min(ys) * 2) / 2, math.ceil(max(ys) * 2) / 2
    X = lambda it: L + (W - L - R) * it / max(1, max(xs))
    Y = lambda v: T + (H - T - B) * (hi - math.log10(max(v, 1e-6))) / max(hi - lo, 0.5)
    d.rectangle([L, T, W - R, H - B], outline="black")
    for k in range(int(lo * 2), int(hi * 2) + 1):  # ticks at decades and half-decades
        v = 10 ** (k / 2)
        d.line([L - 4, Y(v), L, Y(v)], fill="black")
        d.text((4, Y(v) - 6), f"{v:.3g}", fill="black", font=font)
    for it in (0, max(xs) // 2, max(xs)):
        d.text((X(it) - 8, H - B + 6), str(it), fill="black", font=font)
    d.text((L, 8), "uptrain: held-out v-MSE per t-bin (log) vs step", fill="black", font=font)
    d.text((W // 2 - 40, H - 16), "uptrain step", fill="black", font=font)
    for n, b in enumerate(bins):
        col = (int(230 * n / (len(bins) - 1)), 40, int(230 * (1 - n / (len(bins) - 1))))
        d.line([(X(c["iter"]), Y(c["mse_bins"][b])) for c in curve], fill=col, width=2)
        d.text((W - R + 10, T + 16 * n), f"t {100 * b}-{100 * b + 99}", fill=col, font=font)
    im.save(path)


def main():
    config = configurator.configure(globals())
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    P = lambda *a: os.path.join(out, *a)
    os.makedirs(out, exist_ok=True)

    stage("data")  # ------------------------------------------------------------------------------------------
    demo.make_synthetic_dataset(P("images"), n=n_images, seed=0, sizes=((64, 64),))
    items = data.scan_dataset(P("images"), buckets=[(64, 64)], quiet=True)  # sorted by path, as train.py scans
    x_all = torch.stack([data.load_image(it) for it in items])  # (N, 3, 64, 64) in [-1, 1]
    held, train = x_all[:eval_items], x_all[eval_items:]
    print(f"{len(train)} training images, {len(held)} held out")

    stage("vae")  # -------------------------------------------------------------------------------------------
    torch.manual_seed(seed)
    cfg = model.SDXLConfig.tiny()  # tiny text encoders; the VAE and UNet widened (see vae_ch, unet_ch)
    cfg.vae = model.VAEConfig(ch=vae_ch, ch_mult=tuple(vae_ch_mult), num_res_blocks=1)
    cfg.unet = model.UNetConfig(model_channels=unet_ch, channel_mult=tuple(unet_mult), transformer_depth=(0, 1, 1),
                                transformer_depth_middle=1, context_dim=cfg.unet.context_dim,
                                adm_in_channels=cfg.unet.adm_in_channels)
    vae = train_vae(model.VAE(cfg.vae), train)
    mu, sd = normalise_latents_(vae, encode(vae, train))
    with torch.no_grad():
        rec = vae.decode(encode(vae, held)).clamp(-1, 1)
    psnr = (10 * torch.log10(4.0 / (rec - held).pow(2).mean(dim=(1, 2, 3)))).mean().item()  # peak-to-peak 2
    z_std = (encode(vae, train) * model.VAE_SCALE).std(dim=(0, 2, 3))
    print(f"VAE: held-out PSNR {psnr:.2f} dB; raw latent std per channel {[round(v, 3) for v in sd.tolist()]} "
          f"-> after the fold, x VAE_SCALE: {[round(v, 3) for v in z_std.tolist()]}")
    side = Image.new("RGB", (8 * 128, 256), "white")  # top: held-out originals, bottom: their reconstructions
    for i in range(8):
        side.paste(to_pil(held[i], 2), (128 * i, 0)), side.paste(to_pil(rec[i], 2), (128 * i, 128))
    side.save(P("vae_recon.png"))

    stage("start")  # -----------------------------------------------------------------------------------------
    demo.build_tiny_vocab(P("tokenizer"), [it.caption for it in items])
    sdxl = model.SDXL(cfg)  # constructor init: random text encoders (frozen from here on) and a random UNet
    sdxl.first_stage_model.load_state_dict(vae.state_dict())
    checkpoint.save_checkpoint(sdxl, P("start.safetensors"), v_pred=False, ztsnr=False,
                          metadata={"note": f"mini_repro start: VAE {vae_steps} steps, held-out PSNR {psnr:.2f}"})
    with open(P("prompts.txt"), "w") as f:  # the ablation's rows: captions of held-out images
        f.write("\n".join(it.caption for it in items[:4]) + "\n")
    common = [f"--tokenizer={P('tokenizer')}", f"--dataset_dir={P('images')}", f"--cache_dir={P('cache')}",
              f"--eval_items={eval_items}"]
    iters = lambda n: [f"--max_iters={n}", f"--ramp_iters={n}"] if n else []

    stage("eps")  # -------------------------------------------------------------------------------------------
    for name in ("eps", "v0", "vpred"):  # fresh out_dirs: train.py appends to eval.jsonl
        shutil.rmtree(P(name), ignore_errors=True)
    run("train.py", "config/mini_eps.py", f"--out_dir={P('eps')}", f"--init_from={P('start.safetensors')}",
        *common, *iters(eps_iters))
    stage("vpred")  # -----------------------------------------------------------------------------------------
    eps_export = f"--init_from={P('eps', 'model.safetensors')}"
    # step 0 of the curve: one step at an lr far below fp32's resolution of these weights (train.py refuses 0,
    # which trains nothing) leaves the eps weights bit for bit as they are, then train.py's own eval runs
    run("train.py", "config/mini_vpred.py", f"--out_dir={P('v0')}", eps_export, *common, "--max_iters=1",
        "--lr=1e-30", "--min_lr=0", "--eval_interval=1")
    run("train.py", "config/mini_vpred.py", f"--out_dir={P('vpred')}", eps_export, *common, *iters(v_iters))

    stage("ablation")  # --------------------------------------------------------------------------------------
    for name in ("eps", "vpred"):  # same prompts, seeds and held-out images for both
        run("sample_ablation.py", f"--ckpt={P(name, 'model.safetensors')}", f"--out={P(f'ablation_{name}.png')}",
            f"--steps={sample_steps}", f"--prompts={P('prompts.txt')}", "--seeds=[0, 1]", "--height=64",
            f"--dataset_dir={P('images')}", f"--quant_n={eval_items}", "--overwrite=True")  # (a rerun's own files)

    stage("report")  # ----------------------------------------------------------------------------------------
    report(config, P, psnr, mu, sd)



def report(config, P, psnr, mu, sd):
    """results.json (and assets/mini) from the runs' eval logs and the two ablation tables, then the summary."""
    read_jsonl = lambda p: [json.loads(line) for line in open(p)]
    curve = read_jsonl(P("v0", "eval.jsonl"))[:1] + read_jsonl(P("vpred", "eval.jsonl"))
    curve[0]["iter"] = 0  # the lr=1e-30 step changed nothing: this is the eps model read as v
    draw_curve(P("progress.png"), curve)
    quant = {n: json.load(open(P(f"ablation_{n}.json")))["quant"] for n in ("eps", "vpred")}
    labels = list(quant["vpred"]["recon"])  # panel labels, in sample_ablation's panel order
    s = {"vae_psnr_db": round(psnr, 2),
         "v_mse_t900_eps_read_as_v": quant["eps"]["mse_v"][9], "v_mse_t900_uptrained": quant["vpred"]["mse_v"][9],
         "v_mse_t900_curve_step0": curve[0]["mse_bins"][9], "v_mse_t900_curve_final": curve[-1]["mse_bins"][9],
         "x0_err_mean_over_t": {n: {lab: sum(q["recon"][lab]) / len(q["recon"][lab]) for lab in labels}
                                for n, q in quant.items()}}
    s["v_mse_t900_ratio"] = s["v_mse_t900_eps_read_as_v"] / s["v_mse_t900_uptrained"]
    stage(None)
    s["stage_seconds"], s["total_seconds"] = dict(WALLS), round(sum(WALLS.values()), 1)
    results = {"config": config, "summary": s, "curve": curve, "quant": quant,
               "vae_raw_latent": {"mean": mu.tolist(), "std": sd.tolist()}}
    files.write_json(P("results.json"), results, indent=1)
    if assets:
        os.makedirs(os.path.join(REPO, assets), exist_ok=True)
        for name in ("vae_recon.png", "progress.png", "ablation_eps.png", "ablation_vpred.png", "results.json"):
            shutil.copy(P(name), os.path.join(REPO, assets, name))
        print(f"copied the PNGs and results.json to {assets}/")

    print_summary(s, curve, labels)


def print_summary(s, curve, labels):
    print("\n==== miniature reproduction: summary")
    print(f"VAE held-out PSNR                                  {s['vae_psnr_db']:.2f} dB")
    print(f"held-out v-MSE t 900-999 (sample_ablation table)   eps read as v {s['v_mse_t900_eps_read_as_v']:.4f}, "
          f"uptrained {s['v_mse_t900_uptrained']:.4f}: {s['v_mse_t900_ratio']:.1f}x lower")
    print(f"held-out v-MSE t 900-999 (train.py eval curve)     step 0 {s['v_mse_t900_curve_step0']:.4f}, "
          f"step {curve[-1]['iter']} {s['v_mse_t900_curve_final']:.4f}")
    print("x0 reconstruction MSE, mean over 10 t-bins: " + ", ".join(f"[{i + 1}] {l}" for i, l in enumerate(labels)))
    for n in ("eps", "vpred"):
        errs = s["x0_err_mean_over_t"][n].values()
        print(f"  {n:5s} model  " + "  ".join(f"[{i + 1}] {v:.4f}" for i, v in enumerate(errs)))
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in WALLS.items()) +
          f"; total {s['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
