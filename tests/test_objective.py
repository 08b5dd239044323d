"""
objective.py, the loss written once: its value equals the recipe computed here from the formulas alone (numpy,
float64): z = alpha x + sigma eps, v = alpha eps - sigma x, per-sample MSE weighted by sigmoid(k - logSNR_t),
including the zero-SNR step; the eps objective regresses the noise; the held-out eval is repeatable.
"""
import numpy as np
import torch

import model
import objective
import schedule


class Probe(torch.nn.Module):
    """A network whose output is a fixed function of its inputs (it sees z, t, context and y)."""

    def forward(self, z, t, context, y):
        return 0.5 * z + 0.01 * t.float().view(-1, 1, 1, 1) + context.mean() + y.mean(dim=1).view(-1, 1, 1, 1)


def batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(b, 4, 8, 8, generator=g), "context": torch.randn(b, 77, 16, generator=g),
            "pooled": torch.randn(b, 32, generator=g), "time_ids": torch.rand(b, 6, generator=g) * 1024}


def test_loss_is_the_recipe():
    abar = schedule.alphas_cumprod(0.024, True)
    t = torch.tensor([0, 500, 999])  # 999: abar = 0, logSNR = -inf, weight sigmoid(+inf) = 1
    bt, noise = batch(), torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    loss, mse = objective.Objective(abar, "v", "sigmoid", k=5.0)(Probe(), bt, t, noise)
    a = abar.numpy()[t.numpy()].reshape(-1, 1, 1, 1)
    x, e = bt["latents"].double().numpy(), noise.double().numpy()
    z = np.sqrt(a) * x + np.sqrt(1 - a) * e
    y = model.build_y(bt["pooled"], bt["time_ids"]).double().numpy()
    out = 0.5 * z + 0.01 * t.numpy().reshape(-1, 1, 1, 1) + bt["context"].double().numpy().mean() + \
        y.mean(axis=1).reshape(-1, 1, 1, 1)
    v = np.sqrt(a) * e - np.sqrt(1 - a) * x
    want_mse = ((out - v) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        lam = np.log(a.ravel()) - np.log1p(-a.ravel())
    w = 1 / (1 + np.exp(-(5.0 - lam)))
    assert w[-1] == 1.0
    np.testing.assert_allclose(mse.numpy(), want_mse, rtol=1e-5)
    np.testing.assert_allclose(loss.item(), (w * want_mse).mean(), rtol=1e-5)
    # eps prediction regresses the noise itself
    _, mse_eps = objective.Objective(abar, "eps")(Probe(), bt, t, noise)
    np.testing.assert_allclose(mse_eps.numpy(), ((out - e) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)


def test_eval_bins_are_fixed_and_cover_every_bin():
    obj = objective.Objective(schedule.alphas_cumprod(0.024, True), "v")
    batches = [batch(2, 0), batch(1, 3)]
    a, b = obj.eval_bins(Probe(), batches), obj.eval_bins(Probe(), batches)
    assert a == b and len(a) == 10 and all(np.isfinite(a))
    assert objective.EVAL_T.tolist()[-1] == 999 and len(objective.EVAL_T) == 30
