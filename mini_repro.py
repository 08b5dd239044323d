"""
The miniature reproduction: the whole uptrain (docs/maths.md §1, §5, §6) on a small SDXL-topology model, offline,
on 2 CPU cores (59 min with the cores free: README). It uses the real pipeline (train.py,
sample_ablation.py, transfer.py) unchanged.

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
              after a 1-step run at lr 1e-30 (no weight changes) that evaluates the eps model read as v (step 0 of
              the progress curve)
              and again with the other train.py seeds of v_seeds (the headline's spread comes from these runs)
  6. far      the transfer experiment (docs/transfer.md): a far epsilon fine-tune of the eps model (far_iters steps
              of config/mini_eps.py on other images, far_seed and far_sizes), and its own uptrain (config/mini_vpred.py)
  7. transfer python transfer.py --mode=extract  D = vpred - eps, full and at far_ranks; --mode=apply each to the
              far fine-tune; weight distances (how far it drifted next to how large D is)
  8. ablation sample_ablation.py on the eps and vpred exports: four-panel grids + per-t-bin tables on the held-out
              images; the table alone (one 1-step grid cell) for every other model
  9. report   progress curve PNG (PIL), results.json, results.md (the tables and every command), summary; PNGs,
              JSON and markdown copied to assets/mini/
Every table row is measured on the same held-out images: the first eval_items of the base's images, which no run
here trains on (the far images are other pictures: other seed, non-square sources cropped to 64x64).
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
import re
import shlex
import shutil
import statistics
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
from safetensors import safe_open

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
v_seeds = [1337, 1338, 1339]  # train.py --seed of each uptrain from the one eps model (data order, t, noise, caption
#                               dropout); the first (train.py's default) gives the grids and progress.png. The headline
#                               is the mean and spread over these: single runs of 300 steps differ by 2x at t >= 900
last_evals = 3  # train.py's curve, final value: the mean of its last 3 evals (steps 260, 280, 300)
far = True  # the transfer experiment (stages far and transfer); False = the uptrain and its seeds only
far_iters = 600  # the far fine-tune: config/mini_eps.py from the eps export, its lr (warmup, cosine 1e-3 -> 1e-4)
#                  re-run for 600 steps on other images, so that the fine-tune moves the weights farther than D does
far_seed = 1  # demo.make_synthetic_dataset seed of the far fine-tune's images (the base's are seed 0)
far_sizes = ((96, 64), (64, 96))  # (h, w) of the far images: train.py's center crop to 64x64 cuts a third of the
#                  long side, so shapes sit at or over the edges and the size embeddings read 96x64 or 64x96, crop 16
far_ranks = (128, 32, 8)  # LoRA ranks of D (transfer.py --rank), next to the full delta
# -----------------------------------------------------------------------------


WALLS, OPEN = {}, []  # stage -> wall seconds; the running stage as [(name, start)]
_COMMANDS = []  # every subprocess command line, for results.md


def stage(name):
    """Close the running stage (print and record its wall time), open the next one (None: just close)."""
    if OPEN:
        prev, t0 = OPEN.pop()
        WALLS[prev] = round(time.time() - t0, 1)
        print(f"=== {prev}: {WALLS[prev]:.0f}s", flush=True)
    if name:
        OPEN.append((name, time.time()))
        print(f"=== {name}", flush=True)


def run(*args, capture=False):
    """A repo script in a subprocess, its output streamed (or captured, printed and returned); a failure stops
    the reproduction."""
    cmd = [sys.executable, *args]
    print("$ " + " ".join(cmd), flush=True)
    _COMMANDS.append(shlex.join(["python", *args]))
    if not capture:
        subprocess.run(cmd, cwd=REPO, check=True)
        return ""
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(res.stdout + res.stderr, end="", flush=True)
    if res.returncode:
        raise subprocess.CalledProcessError(res.returncode, cmd)
    return res.stdout


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
    if far:  # other pictures: no far image is 64x64, so none is a held-out image
        demo.make_synthetic_dataset(P("images_far"), n=n_images, seed=far_seed, sizes=tuple(map(tuple, far_sizes)))

    stage("vae")  # -------------------------------------------------------------------------------------------
    cfg, vae, psnr, mu, sd = make_vae(P, held, train)

    stage("start")  # -----------------------------------------------------------------------------------------
    demo.build_tiny_vocab(P("tokenizer"), [it.caption for it in items])
    sdxl = model.SDXL(cfg)  # constructor init: random text encoders (frozen from here on) and a random UNet
    sdxl.first_stage_model.load_state_dict(vae.state_dict())
    checkpoint.save_checkpoint(sdxl, P("start.safetensors"), v_pred=False, ztsnr=False,
                          metadata={"note": f"mini_repro start: VAE {vae_steps} steps, held-out PSNR {psnr:.2f}"})
    with open(P("prompts.txt"), "w") as f:  # the ablation's rows: captions of held-out images
        f.write("\n".join(it.caption for it in items[:4]) + "\n")

    train_models(P)
    shares = transfer_models(P) if far else {}
    weights = weight_distances(P) if far else {}

    stage("ablation")  # --------------------------------------------------------------------------------------
    for name in ("eps", "vpred"):  # same prompts, seeds and held-out images for both
        ablation(P, name, grid=True)
    for name in table_models():
        ablation(P, name, grid=False)

    stage("report")  # ----------------------------------------------------------------------------------------
    report(config, P, psnr, mu, sd, shares, weights)


def make_vae(P, held, train):
    """The small VAE, trained and its latents normalised -> (SDXL config, vae, held-out PSNR, raw mu, raw std)."""
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
    for i in range(min(8, len(held))):
        side.paste(to_pil(held[i], 2), (128 * i, 0)), side.paste(to_pil(rec[i], 2), (128 * i, 128))
    side.save(P("vae_recon.png"))
    return cfg, vae, psnr, mu, sd


def vpred_dir(s):
    """The uptrain of train.py seed s: vpred/ for the first of v_seeds, vpred_s<seed>/ for the others."""
    return "vpred" if s == v_seeds[0] else f"vpred_s{s}"


def table_models():
    """The models measured by the table alone (the grids are the eps and first vpred models')."""
    names = [vpred_dir(s) for s in v_seeds[1:]]
    if far:
        names += ["far_eps", "far_delta", *[f"far_r{r}" for r in far_ranks], "far_vpred"]
    return names


def train_models(P):
    """The stages eps, vpred (step 0 and every seed) and far (the far fine-tune and its own uptrain): train.py."""
    common = lambda images: [f"--tokenizer={P('tokenizer')}", f"--dataset_dir={P(images)}",
                             f"--cache_dir={P('cache')}", f"--eval_items={eval_items}"]
    iters = lambda n: [f"--max_iters={n}", f"--ramp_iters={n}"] if n else []
    export = lambda name: f"--init_from={P(name, 'model.safetensors')}"
    names = ["eps", "v0", *map(vpred_dir, v_seeds)] + (["far_eps", "far_vpred"] if far else [])
    for name in names:  # fresh out_dirs: train.py appends to eval.jsonl
        shutil.rmtree(P(name), ignore_errors=True)

    stage("eps")  # -------------------------------------------------------------------------------------------
    run("train.py", "config/mini_eps.py", f"--out_dir={P('eps')}", f"--init_from={P('start.safetensors')}",
        *common("images"), *iters(eps_iters))
    stage("vpred")  # -----------------------------------------------------------------------------------------
    # step 0 of the curve: one step at an lr far below fp32's resolution of these weights (train.py refuses 0,
    # which trains nothing) leaves the eps weights bit for bit as they are, then train.py's own eval runs
    run("train.py", "config/mini_vpred.py", f"--out_dir={P('v0')}", export("eps"), *common("images"), "--max_iters=1",
        "--lr=1e-30", "--min_lr=0", "--eval_interval=1")
    for s in v_seeds:
        run("train.py", "config/mini_vpred.py", f"--out_dir={P(vpred_dir(s))}", export("eps"), *common("images"),
            *iters(v_iters), f"--seed={s}")
    if not far:
        return
    stage("far")  # -------------------------------------------------------------------------------------------
    # the eps recipe again from the eps export, on the far images: warmup back to the pretrain's peak lr
    run("train.py", "config/mini_eps.py", f"--out_dir={P('far_eps')}", export("eps"), *common("images_far"),
        *iters(far_iters))
    # its own uptrain: the same recipe and length as the base's, on its own images
    run("train.py", "config/mini_vpred.py", f"--out_dir={P('far_vpred')}", export("far_eps"), *common("images_far"),
        *iters(v_iters), f"--seed={v_seeds[0]}")


def transfer_models(P):
    """D = vpred - eps (the first seed's uptrain), full and as LoRAs, each added to the far fine-tune with the
    shipped tool -> {rank: share of D's sum of squares the file keeps, as transfer.py prints it}."""
    stage("transfer")  # --------------------------------------------------------------------------------------
    os.makedirs(P("transfer"), exist_ok=True)
    shares = {}
    for r in (0, *far_ranks):
        f = P("transfer", "delta.safetensors" if r == 0 else f"lora_r{r}.safetensors")
        name = "far_delta" if r == 0 else f"far_r{r}"
        shutil.rmtree(P(name), ignore_errors=True)
        text = run("transfer.py", "--mode=extract", f"--eps={P('eps', 'model.safetensors')}",
                   f"--vpred={P('vpred', 'model.safetensors')}", f"--out={f}", f"--rank={r}", "--overwrite=True",
                   capture=True)
        shares[r] = float(re.search(r"([\d.]+)% of the delta's sum of squares kept", text).group(1)) / 100
        run("transfer.py", "--mode=apply", f"--base={P('far_eps', 'model.safetensors')}", f"--delta={f}",
            f"--out={P(name, 'model.safetensors')}", f"--tokenizer={P('tokenizer')}")
    return shares


def ablation(P, name, grid):
    """sample_ablation.py on P(name)'s export: the four-panel grid and the table, or (grid False) the table alone
    with a one-prompt, one-step grid, which the table does not depend on (its own noise and held-out images)."""
    how = [f"--steps={sample_steps}", f"--prompts={P('prompts.txt')}", "--seeds=[0, 1]"] if grid else \
        ["--steps=1", "--prompts=a red circle", "--seeds=[0]"]
    run("sample_ablation.py", f"--ckpt={P(name, 'model.safetensors')}", f"--out={P(f'ablation_{name}.png')}", *how,
        "--height=64", f"--tokenizer={P('tokenizer')}", f"--dataset_dir={P('images')}", f"--quant_n={eval_items}",
        "--overwrite=True")  # (a rerun's own files)


def unet_tensors(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k).double() for k in f.keys() if k.startswith(checkpoint.PREFIX["unet"])}


def weight_distances(P):
    """How far the far fine-tune drifted next to how large D is: Frobenius norms over every UNet tensor, relative to
    the eps model's, and the cosine between D and the far model's own uptrain delta."""
    w = {n: unet_tensors(P(n, "model.safetensors")) for n in ("eps", "vpred", "far_eps", "far_vpred")}
    norm = lambda a, b: math.sqrt(sum((w[a][k] - (w[b][k] if b else 0)).pow(2).sum().item() for k in w[a]))
    dot = sum(((w["vpred"][k] - w["eps"][k]) * (w["far_vpred"][k] - w["far_eps"][k])).sum().item() for k in w["eps"])
    base = norm("eps", None)
    res = {"eps_norm": base, "far_eps_minus_eps": norm("far_eps", "eps") / base,
           "D": norm("vpred", "eps") / base, "D_far": norm("far_vpred", "far_eps") / base}
    res["cos_D_D_far"] = dot / (norm("vpred", "eps") * norm("far_vpred", "far_eps"))
    print(f"UNet weight distances, relative to ||W_eps||: far fine-tune {res['far_eps_minus_eps']:.4f}, D (the uptrain)"
          f" {res['D']:.4f}, the far model's own uptrain {res['D_far']:.4f}; cos(D, D_far) {res['cos_D_D_far']:.3f}")
    return res


def report(config, P, psnr, mu, sd, shares, weights):
    """results.json and results.md (and assets/mini) from the runs' eval logs and the ablation tables, then the
    summary."""
    read_jsonl = lambda p: [json.loads(line) for line in open(p)]
    curves = {s: read_jsonl(P(vpred_dir(s), "eval.jsonl")) for s in v_seeds}
    curve = read_jsonl(P("v0", "eval.jsonl"))[:1] + curves[v_seeds[0]]
    curve[0]["iter"] = 0  # the lr=1e-30 step changed nothing: this is the eps model read as v
    draw_curve(P("progress.png"), curve)
    quant = {n: json.load(open(P(f"ablation_{n}.json")))["quant"] for n in ("eps", "vpred", *table_models())}
    labels = list(quant["vpred"]["recon"])  # panel labels, in sample_ablation's panel order
    x0_err = lambda n: {lab: sum(quant[n]["recon"][lab]) / len(quant[n]["recon"][lab]) for lab in labels}
    s = {"vae_psnr_db": round(psnr, 2),
         "v_mse_t900_eps_read_as_v": quant["eps"]["mse_v"][9], "v_mse_t900_uptrained": quant["vpred"]["mse_v"][9],
         "v_mse_t900_curve_step0": curve[0]["mse_bins"][9], "v_mse_t900_curve_final": curve[-1]["mse_bins"][9],
         "x0_err_mean_over_t": {n: x0_err(n) for n in ("eps", "vpred")}}
    s["v_mse_t900_ratio"] = s["v_mse_t900_eps_read_as_v"] / s["v_mse_t900_uptrained"]
    seeds = seed_headline(quant, curves, curve[0]["mse_bins"][9], labels, x0_err)
    rows = transfer_rows(quant, x0_err, labels, shares) if far else []
    stage(None)
    s["stage_seconds"], s["total_seconds"] = dict(WALLS), round(sum(WALLS.values()), 1)
    results = {"config": config, "summary": s, "seeds": seeds, "transfer": {"rows": rows, "weights": weights},
               "curve": curve, "curves": {str(k): v for k, v in curves.items()}, "quant": quant,
               "vae_raw_latent": {"mean": mu.tolist(), "std": sd.tolist()}, "commands": list(_COMMANDS)}
    files.write_json(P("results.json"), results, indent=1)
    files.write_text(P("results.md"), results_md(s, seeds, rows, weights))
    if assets:
        os.makedirs(os.path.join(REPO, assets), exist_ok=True)
        for name in ("vae_recon.png", "progress.png", "ablation_eps.png", "ablation_vpred.png", "results.json",
                     "results.md"):
            shutil.copy(P(name), os.path.join(REPO, assets, name))
        print(f"copied the PNGs, results.json and results.md to {assets}/")
    print_summary(s, curve, labels)
    print(results_md(s, seeds, rows, weights, commands=False))


def spread(values):
    """mean, sample std (n - 1; 0 for one value), min, max and the values themselves."""
    vals = [float(v) for v in values]
    return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "values": vals}


def seed_headline(quant, curves, step0, labels, x0_err):
    """The headline over the uptrain seeds (one eps model): the t >= 900 drop from the table and from train.py's
    curve (its final value = the mean of its last last_evals evals), and the x0 errors per panel."""
    eps_t900 = quant["eps"]["mse_v"][9]
    t900 = [quant[vpred_dir(s)]["mse_v"][9] for s in v_seeds]
    final = [statistics.mean(c["mse_bins"][9] for c in curves[s][-last_evals:]) for s in v_seeds]
    return {"seeds": list(v_seeds), "last_evals": last_evals, "v_mse_t900_eps_read_as_v": eps_t900,
            "v_mse_t900_uptrained": spread(t900), "v_mse_t900_ratio": spread(eps_t900 / v for v in t900),
            "curve_t900_step0": step0, "curve_t900_final": spread(final),
            "curve_t900_ratio": spread(step0 / v for v in final),
            "x0_err_mean_over_t": {lab: spread(x0_err(vpred_dir(s))[lab] for s in v_seeds) for lab in labels}}


def transfer_rows(quant, x0_err, labels, shares):
    """The transfer table, one row per model: x0 error of each panel (mean over t-bins) and the v-MSE at t >= 900,
    all on the base's held-out images."""
    names = [("far_eps", "far fine-tune read as v (no conversion)", None),
             ("far_delta", "far fine-tune + D (full delta, no training)", shares.get(0)),
             *[(f"far_r{r}", f"far fine-tune + rank-{r} LoRA of D", shares.get(r)) for r in far_ranks],
             ("far_vpred", "far fine-tune uptrained by the recipe on its own images", None),
             ("vpred", f"base uptrained (reference, seed {v_seeds[0]})", None),
             ("eps", "base eps model read as v (reference)", None)]
    return [{"model": n, "row": label, "share_of_D": share, "x0_err": x0_err(n), "v_mse_t900": quant[n]["mse_v"][9]}
            for n, label, share in names]


def results_md(s, seeds, rows, weights, commands=True):
    """The tables as markdown (assets/mini/results.md), with the commands that made them."""
    pm = lambda d, f="{:.4f}": \
        f"{f.format(d['mean'])} ± {f.format(d['std'])} ({f.format(d['min'])}-{f.format(d['max'])})"
    lab = list(seeds["x0_err_mean_over_t"])
    lines = [f"## Uptrain headline over {len(seeds['seeds'])} train.py seeds {seeds['seeds']} (one eps model): "
             "mean ± sample std (min-max)", "",
             "| metric | eps model | uptrained |", "|---|---|---|",
             f"| held-out v-MSE, t 900-999 (sample_ablation table) | {seeds['v_mse_t900_eps_read_as_v']:.4f} | "
             f"{pm(seeds['v_mse_t900_uptrained'])} |",
             f"| drop at t 900-999 (eps read as v / uptrained) | | {pm(seeds['v_mse_t900_ratio'], '{:.1f}')}x |",
             f"| train.py eval curve, t 900-999 (step 0; mean of the last {seeds['last_evals']} evals) | "
             f"{seeds['curve_t900_step0']:.4f} | {pm(seeds['curve_t900_final'])} |",
             f"| drop on the curve | | {pm(seeds['curve_t900_ratio'], '{:.1f}')}x |"]
    lines += [f"| x0 error, mean over t-bins, panel {i + 1} ({l}) | {s['x0_err_mean_over_t']['eps'][l]:.4f} | "
              f"{pm(seeds['x0_err_mean_over_t'][l])} |" for i, l in enumerate(lab)]
    if rows:
        lines += ["", "## Transfer of D = W_vpred - W_eps to the far fine-tune (held-out images of the base)", "",
                  "| model | share of D's sum of squares | x0 error, panel 1 (0.024 + zsnr, as v), mean over t-bins | "
                  "v-MSE, t 900-999 | x0 error, panel 4 (0.012, as eps) |", "|---|---|---|---|---|"]
        share = lambda r: "" if r["share_of_D"] is None else f"{100 * r['share_of_D']:.2f}%"
        lines += [f"| {r['row']} | {share(r)} | {r['x0_err'][lab[0]]:.4f} | {r['v_mse_t900']:.4f} | "
                  f"{r['x0_err'][lab[-1]]:.4f} |" for r in rows]
    if weights:
        lines += ["", f"UNet weight distances relative to ||W_eps||: far fine-tune ||W_far - W_eps|| "
                      f"{weights['far_eps_minus_eps']:.4f}; D {weights['D']:.4f}; the far model's own uptrain delta "
                      f"{weights['D_far']:.4f}; cosine(D, own delta) {weights['cos_D_D_far']:.3f}"]
    if commands:
        lines += ["", "## Commands", "", "```bash", shlex.join(["python", "mini_repro.py", *sys.argv[1:]]),
                  "# which ran:", *_COMMANDS, "```"]
    return "\n".join(lines) + "\n"


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
