"""
The noise schedule, the v target, the loss weightings and the DDIM sampler: the maths of docs/maths.md, one
formula per function, with its paper:
- DDPM scaled-linear betas (Rombach et al. 2022, the SD/SDXL schedule), computed in float64;
- zero terminal SNR rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
  Flawed", arXiv 2305.08891, Algorithm 1), trailing timesteps (§3.3) and CFG rescale (§3.4);
- v-parameterisation (Salimans & Ho 2022, "Progressive Distillation", arXiv 2202.00512, §4 / App. D);
- sigmoid loss weighting (Kingma & Gao 2023, "Understanding Diffusion Objectives", arXiv 2303.00848) and
  Min-SNR (Hang et al. 2023, arXiv 2303.09556);
- DDIM, eta=0 (Song et al. 2021, arXiv 2010.02502, eq. 12).
Schedule arrays stay float64 (as in guided-diffusion) and are cast at use, so the zero-SNR step is exactly 0.0
and every log / reciprocal of it is guarded here, in one place.
"""
import numpy as np
import torch

# -----------------------------------------------------------------------------
# schedule

def alphas_cumprod(beta_end=0.012, zsnr=False, beta_start=0.00085, num_timesteps=1000):
    """abar_t for t = 0..T-1, float64. beta_end 0.012 is SDXL's pretrain schedule, 0.024 the uptrain's."""
    # scaled-linear: linear in sqrt(beta), squared (the SD/SDXL schedule)
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    if zsnr:
        # Lin et al. Alg. 1: shift and scale sqrt(abar) so the last step has alpha = 0 and the first is unchanged
        s = abar.sqrt()
        s0, sT = s[0], s[-1]
        abar = ((s - sT) * s0 / (s0 - sT)) ** 2
        abar[-1] = 0.0  # exact, not 1e-20 from rounding
    return abar


def log_snr(abar):
    """lambda = log(abar / (1 - abar)), float64; -inf (never NaN) where abar == 0 (the zsnr terminal step)."""
    abar = abar.double()
    return torch.log(abar) - torch.log1p(-abar)


def _at(abar, t, x):
    """abar[t] as x's dtype/device, shaped to broadcast against x [B, ...]; t: int or LongTensor[B]."""
    a = abar.to(x.device)[torch.as_tensor(t, device=x.device).long()]
    return a.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


# -----------------------------------------------------------------------------
# forward process and the v target (z = alpha x + sigma eps, alpha^2 + sigma^2 = 1)

def add_noise(x0, noise, t, abar):
    """z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    a = _at(abar, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_target(x0, noise, t, abar):
    """v = alpha eps - sigma x (Salimans & Ho eq. in App. D; diffusers get_velocity)."""
    a = _at(abar, t, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


# -----------------------------------------------------------------------------
# loss weighting: a per-sample multiplier m(t) on the per-sample v-MSE (docs/maths.md §4)

WEIGHTINGS = ("sigmoid", "kg_sigmoid", "min_snr", "none")

def loss_weight(t, abar, kind="sigmoid", k=5.0, gamma=5.0):
    """m(t) as float32 [B] on t's device. All four are finite at the zero-SNR step (lambda = -inf)."""
    t = torch.as_tensor(t).long()
    abar = abar.to(t.device)  # index on t's device: no host sync in the training step
    lam = log_snr(abar)[t]  # float64
    if kind == "sigmoid":
        # the recipe, literally: sigmoid(k - lambda) on the v-MSE; sigmoid(+inf) = 1 at the zsnr step
        w = torch.sigmoid(k - lam)
    elif kind == "kg_sigmoid":
        # Kingma & Gao's eps-space sigmoid carried into v-space: ||eps - eps_hat||^2 = abar ||v - v_hat||^2
        w = torch.sigmoid(k - lam) * abar.double()[t]
    elif kind == "min_snr":
        # Min-SNR-gamma for a v-loss: min(SNR, gamma) / (SNR + 1); SNR = exp(lambda) = 0 at the zsnr step -> 0
        snr = torch.exp(lam)
        w = torch.clamp(snr, max=gamma) / (snr + 1)
    elif kind == "none":
        w = torch.ones_like(lam)
    else:
        raise ValueError(f"unknown loss weighting {kind!r}; choose one of {WEIGHTINGS}")
    return w.float()


# -----------------------------------------------------------------------------
# sampling: DDIM (eta = 0) on trailing timesteps, CFG with rescale

def trailing_timesteps(n, num_timesteps=1000):
    """t_i = round(T - i T/n) - 1, descending, first = T-1 (Lin et al. §3.3; diffusers 'trailing')."""
    assert 1 <= n <= num_timesteps, f"need 1 <= steps <= {num_timesteps}, got {n}"
    # numpy arange + round so the grid matches diffusers' np.round (half to even) exactly
    t = np.round(np.arange(num_timesteps, 0, -num_timesteps / n)).astype(np.int64) - 1
    return torch.from_numpy(t)


def ddim_step(model_output, t, t_prev, z, abar, prediction="v"):
    """One eta=0 DDIM step t -> t_prev with the *sampler's* abar; returns (z_prev, x0_hat). The output is read as
    v (x_hat = a z - s o, eps_hat = s z + a o) or eps (x_hat = (z - s o) / a); t_prev = -1 ends at x0_hat."""
    o = model_output.to(z.dtype)
    a_t = _at(abar, t, z)
    alpha, sigma = a_t.sqrt(), (1 - a_t).sqrt()
    if prediction == "v":
        x0 = alpha * z - sigma * o
        eps = sigma * z + alpha * o
    elif prediction == "eps":
        if bool((a_t == 0).any()):
            raise ValueError(f"cannot read the output as eps at t={int(torch.as_tensor(t).max())}: abar_t = 0 "
                             "(zero terminal SNR), x0 = (z - sigma eps) / alpha divides by 0; read it as v")
        eps = o
        x0 = (z - sigma * o) / alpha
    else:
        raise ValueError(f"prediction must be 'v' or 'eps', got {prediction!r}")
    if int(torch.as_tensor(t_prev).max()) < 0:
        return x0, x0
    a_s = _at(abar, t_prev, z)
    return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps, x0


def cfg_rescale(pos, neg, scale, phi=0.7):
    """Classifier-free guidance with rescale (Lin et al. §3.4): match g's per-sample std to pos's, mix by phi."""
    g = neg + scale * (pos - neg)
    if phi == 0:
        return g
    dims = list(range(1, pos.dim()))
    g_r = g * (pos.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True))
    return phi * g_r + (1 - phi) * g


@torch.no_grad()
def sample(model_fn, noise, abar, steps=25, prediction="v", guidance=1.0, phi=0.7):
    """DDIM (eta=0) from pure noise on `steps` trailing timesteps; returns x0 (latents, model scale). model_fn(z, t)
    returns the output [B,...], or with guidance != 1 (conditional, unconditional), mixed by cfg_rescale."""
    z = noise.float()
    ts = trailing_timesteps(steps, len(abar)).tolist()
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        out = model_fn(z, torch.full((z.shape[0],), t, dtype=torch.long, device=z.device))
        if guidance != 1.0:
            pos, neg = out
            out = cfg_rescale(pos.float(), neg.float(), guidance, phi)
        z, _ = ddim_step(out.float(), t, t_prev, z, abar, prediction)
    return z
