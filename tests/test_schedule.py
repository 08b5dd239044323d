"""schedule.py against docs/maths.md's test vectors, the VP identities, and diffusers' schedulers as the oracle."""
import math

import pytest
import torch

import schedule as S

SCHEDULES = [(0.012, False), (0.012, True), (0.024, False), (0.024, True)]


# independent formulas the tests check the schedule against (docs/maths.md §2, §3)
def betas_from_abar(abar):
    """beta_t = 1 - abar_t / abar_{t-1} (beta_0 = 1 - abar_0); 1.0 exactly at a zero-SNR last step."""
    return 1.0 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


def x0_from_v(z, v, t, abar):  # x_hat = alpha z - sigma v_hat
    a = abar[t].reshape(-1, *([1] * (z.dim() - 1))).to(z.dtype)
    return a.sqrt() * z - (1 - a).sqrt() * v


def eps_from_v(z, v, t, abar):  # eps_hat = sigma z + alpha v_hat
    a = abar[t].reshape(-1, *([1] * (z.dim() - 1))).to(z.dtype)
    return (1 - a).sqrt() * z + a.sqrt() * v


def sigma_max(abar):  # the equivalent k-diffusion (VE) sigma at the last step
    a = float(abar[-1])
    return math.inf if a == 0 else math.sqrt((1 - a) / a)

# docs/maths.md §2: abar_t for the four schedules
VECTORS = {
    0: (0.99915, 0.99915, 0.99915, 0.99915),
    1: (0.9982960278, 0.9982334461, 0.9982933723, 0.998287146),
    249: (0.6754324137, 0.6541890065, 0.5923499932, 0.5897797269),
    499: (0.2776696505, 0.2423591666, 0.1347461477, 0.1313914828),
    749: (0.0566234916, 0.03317148283, 0.007108224842, 0.006030511117),
    998: (0.0047166989, 1.967888057e-07, 5.332751873e-05, 7.886143824e-09),
    999: (0.004660098513, 0.0, 5.204765828e-05, 0.0),
}


@pytest.mark.parametrize("col", range(4))
def test_abar_vectors(col):
    beta_end, zsnr = SCHEDULES[col]
    abar = S.alphas_cumprod(beta_end, zsnr)
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    for t, row in VECTORS.items():
        want = row[col]
        assert abar[t].item() == pytest.approx(want, rel=2e-9, abs=1e-12), (t, beta_end, zsnr)


def test_more_vectors():
    b = betas_from_abar(S.alphas_cumprod(0.024))
    assert b[999].item() == pytest.approx(0.024, rel=1e-12)
    abar_z = S.alphas_cumprod(0.024, zsnr=True)
    bz = betas_from_abar(abar_z)
    assert bz[998].item() == pytest.approx(0.7526157344, rel=1e-9)
    assert bz[999].item() == 1.0 and abar_z[999].item() == 0.0
    assert abar_z[0].item() == S.alphas_cumprod(0.024)[0].item()  # abar_0 unchanged by the rescale
    lam = S.log_snr(abar_z)
    assert lam[499].item() == pytest.approx(-1.88871, abs=1e-5)
    assert lam[999].item() == -math.inf and not torch.isnan(lam).any()
    for be, z in SCHEDULES:
        assert S.log_snr(S.alphas_cumprod(be, z))[0].item() == pytest.approx(7.06942, abs=1e-5)
    assert sigma_max(S.alphas_cumprod(0.012)) == pytest.approx(14.6146, abs=1e-4)
    assert sigma_max(S.alphas_cumprod(0.024)) == pytest.approx(138.608, abs=1e-3)
    # docs/maths.md §5: lambda at t=749 and 998 on the three sampler schedules
    for (be, z), l749, l998 in [((0.024, True), -5.105, -18.66), ((0.024, False), -4.939, -9.839),
                                ((0.012, False), -2.813, -5.352)]:
        lam = S.log_snr(S.alphas_cumprod(be, z))
        assert lam[749].item() == pytest.approx(l749, abs=1e-3)
        assert lam[998].item() == pytest.approx(l998, abs=1e-2)


def test_loss_weight_table():
    abar = S.alphas_cumprod(0.024, zsnr=True)
    t = torch.tensor([0, 249, 499, 749, 999])
    table = {
        "sigmoid": (0.112104, 0.990406, 0.998982, 0.999959, 1.0),
        "kg_sigmoid": (0.112009, 0.584121, 0.131258, 0.00603026, 0.0),
        "min_snr": (0.00425, 0.58978, 0.131391, 0.0060305, 0.0),
        "none": (1, 1, 1, 1, 1),
    }
    for kind, want in table.items():
        w = S.loss_weight(t, abar, kind, k=5.0, gamma=5.0)
        assert w.shape == (5,) and torch.isfinite(w).all(), kind
        for got, exp in zip(w.tolist(), want):
            assert got == pytest.approx(exp, rel=2e-4, abs=2e-6), (kind, got, exp)
    # every t, every kind, finite; sigmoid-k crosses 0.5 at t=7 with k=5 (docs/maths.md §4)
    tt = torch.arange(1000)
    for kind in S.WEIGHTINGS:
        assert torch.isfinite(S.loss_weight(tt, abar, kind)).all()
    w = S.loss_weight(tt, abar, "sigmoid")
    assert w[6] < 0.5 < w[7]
    with pytest.raises(ValueError, match="unknown loss weighting"):
        S.loss_weight(tt, abar, "snr")


def test_identities():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 300, 700, 998, 999])
    abar = S.alphas_cumprod(0.024, zsnr=True)
    z = S.add_noise(x, eps, t, abar)
    v = S.v_target(x, eps, t, abar)
    torch.testing.assert_close(x0_from_v(z, v, t, abar), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_from_v(z, v, t, abar), eps, rtol=0, atol=1e-12)
    # at the zsnr step z is pure noise and v = -x
    torch.testing.assert_close(z[5], eps[5])
    torch.testing.assert_close(v[5], -x[5])
    # eps - eps_hat = alpha (v - v_hat), x - x_hat = -sigma (v - v_hat)
    dv = 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype)
    a = abar[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(eps - eps_from_v(z, v + dv, t, abar), -a.sqrt() * dv)
    torch.testing.assert_close(x - x0_from_v(z, v + dv, t, abar), (1 - a).sqrt() * dv)
    # alpha^2 = sigmoid(lambda)
    torch.testing.assert_close(torch.sigmoid(S.log_snr(abar)), abar)


def test_trailing_timesteps():
    assert S.trailing_timesteps(10).tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    t25 = S.trailing_timesteps(25).tolist()
    assert t25[:2] == [999, 959] and t25[-1] == 39 and len(t25) == 25
    assert S.trailing_timesteps(1).tolist() == [999]


def test_eps_at_zero_snr_raises():
    abar = S.alphas_cumprod(0.024, zsnr=True)
    z = torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        S.ddim_step(torch.randn_like(z), 999, 899, z, abar, prediction="eps")
    # read as v it is fine: x_hat = -v_hat exactly
    v = torch.randn_like(z)
    zp, x0 = S.ddim_step(v, 999, 899, z, abar, prediction="v")
    assert torch.equal(x0, -v) and torch.isfinite(zp).all()


def test_cfg_rescale_plain_and_formula():
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    torch.testing.assert_close(S.cfg_rescale(pos, neg, 5.0, phi=0.0), neg + 5 * (pos - neg))
    out = S.cfg_rescale(pos, neg, 5.0, phi=1.0)
    # phi=1: per-sample std equals pos's
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), pos.std(dim=(1, 2, 3)))


# ---------------------------------------------------------------------------- diffusers oracle
diffusers = pytest.importorskip("diffusers")


def _ddpm(beta_end, zsnr, prediction="v_prediction"):
    return diffusers.DDPMScheduler(beta_start=0.00085, beta_end=beta_end, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, rescale_betas_zero_snr=zsnr,
                                   prediction_type=prediction)


@pytest.mark.parametrize("beta_end,zsnr", SCHEDULES + [(0.018, True), (0.0085, False)])
def test_oracle_abar_noise_velocity(beta_end, zsnr):
    ref = _ddpm(beta_end, zsnr)
    abar = S.alphas_cumprod(beta_end, zsnr)
    assert (abar.float() - ref.alphas_cumprod).abs().max() < 1e-6
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, 6, 7, generator=g)
    eps = torch.randn(5, 4, 6, 7, generator=g)
    t = torch.tensor([0, 10, 500, 998, 999])
    torch.testing.assert_close(S.add_noise(x, eps, t, abar), ref.add_noise(x, eps, t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(S.v_target(x, eps, t, abar), ref.get_velocity(x, eps, t), atol=1e-5, rtol=1e-5)


def _ddim(beta_end, zsnr, prediction, num_timesteps=1000):
    return diffusers.DDIMScheduler(beta_start=0.00085, beta_end=beta_end, beta_schedule="scaled_linear",
                                   num_train_timesteps=num_timesteps, rescale_betas_zero_snr=zsnr,
                                   prediction_type=prediction, timestep_spacing="trailing",
                                   set_alpha_to_one=True, clip_sample=False)


@pytest.mark.parametrize("prediction", ["v", "eps"])
@pytest.mark.parametrize("beta_end,zsnr", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 4, 10, 25, 33])
def test_oracle_ddim(prediction, beta_end, zsnr, steps):
    ref = _ddim(beta_end, zsnr, "v_prediction" if prediction == "v" else "epsilon")
    ref.set_timesteps(steps)
    assert ref.timesteps.tolist() == S.trailing_timesteps(steps).tolist()
    abar = S.alphas_cumprod(beta_end, zsnr)
    g = torch.Generator().manual_seed(steps)
    z = torch.randn(2, 4, 8, 6, generator=g)
    ts = S.trailing_timesteps(steps).tolist()
    for i, t in enumerate(ts):
        out = torch.randn(z.shape, generator=g)
        # diffusers' DDIM steps to t - T//n, which is the next trailing timestep only when n divides T;
        # ddim_step takes t_prev explicitly, so give it the oracle's (sample() uses the true next timestep)
        t_prev = t - 1000 // steps
        if prediction == "eps" and abar[t] == 0:
            with pytest.raises(ValueError):
                S.ddim_step(out, t, t_prev, z, abar, prediction)
            z = torch.randn(z.shape, generator=g)  # skip the undefined step, keep comparing afterwards
            continue
        zp, x0 = S.ddim_step(out, t, t_prev, z, abar, prediction)
        r = ref.step(out, t, z)
        torch.testing.assert_close(x0, r.pred_original_sample, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(zp, r.prev_sample, atol=2e-4, rtol=2e-4)  # set_alpha_to_one: last = x0
        z = zp
    if zsnr and prediction == "v":  # docs/maths.md §5: at t=999 the oracle's x0 is exactly -v_hat
        ref.set_timesteps(steps)
        o = torch.randn(z.shape, generator=g)
        assert torch.equal(ref.step(o, 999, z).pred_original_sample, -o)


def test_oracle_other_T():
    # an outside test may use other schedules and step counts: T=500
    ref = _ddim(0.02, True, "v_prediction", num_timesteps=500)
    ref.set_timesteps(7)
    assert ref.timesteps.tolist() == S.trailing_timesteps(7, 500).tolist()
    abar = S.alphas_cumprod(0.02, True, num_timesteps=500)
    assert (abar.float() - ref.alphas_cumprod).abs().max() < 1e-6


def test_oracle_cfg_rescale():
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg
    g = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(3, 4, 9, 7, generator=g), torch.randn(3, 4, 9, 7, generator=g)
    for scale, phi in [(5.0, 0.7), (7.5, 0.0), (3.0, 1.0)]:
        cfg = neg + scale * (pos - neg)
        torch.testing.assert_close(S.cfg_rescale(pos, neg, scale, phi), rescale_noise_cfg(cfg, pos, guidance_rescale=phi))


def test_sample_loop_matches_oracle_loop():
    # the whole sampler (CFG rescale + DDIM on trailing steps) against diffusers' scheduler driven by hand
    abar = S.alphas_cumprod(0.024, zsnr=True)
    ref = _ddim(0.024, True, "v_prediction")
    ref.set_timesteps(8)
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    def fn(z, t):  # a deterministic stand-in model with separate cond/uncond outputs
        s = (t.float() / 1000).reshape(-1, 1, 1, 1)
        return torch.tanh(z) * (1 - s) + 0.3 * s, 0.5 * z * s - 0.1

    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(4))
    ours = S.sample(fn, noise, abar, steps=8, prediction="v", guidance=4.0, phi=0.7)
    z = noise.clone()
    for t in ref.timesteps:
        pos, neg = fn(z, torch.full((2,), int(t)))
        out = rescale_noise_cfg(neg + 4.0 * (pos - neg), pos, guidance_rescale=0.7)
        z = ref.step(out, t, z).prev_sample
    torch.testing.assert_close(ours, z, atol=2e-4, rtol=2e-4)
