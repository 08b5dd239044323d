"""
The training objective, written once (docs/maths.md §2-4): noise the cached latents at t on the training
schedule, regress the v (or eps) target, weight each sample's MSE by m(t). train.py, bench.py, memory.py and
sample_ablation.py all call it (the role of k-diffusion's Denoiser.loss or minRF's RF.forward).
"""
from contextlib import nullcontext

import torch

import model
import schedule

# the held-out eval's timesteps: 3 fixed t in each 100-wide bin, t = 999 included (docs/maths.md §6)
EVAL_T = torch.tensor([b * 100 + o for b in range(10) for o in (0, 50, 99)])


class Objective:
    """abar: the training schedule (float64, on the training device); weighting, k, gamma: m(t)
    (schedule.loss_weight); channels_last: hand the network NHWC inputs (cuDNN's fast convolutions)."""

    def __init__(self, abar, prediction="v", weighting="sigmoid", k=5.0, gamma=5.0, autocast=None,
                 channels_last=False):
        self.abar, self.prediction, self.channels_last = abar, prediction, channels_last
        self.weighting, self.k, self.gamma = weighting, k, gamma
        self.autocast = autocast if autocast is not None else nullcontext()

    def noised(self, x0, noise, t):
        return schedule.add_noise(x0, noise, t, self.abar)

    def target(self, x0, noise, t):
        """What the network learns to output: v = alpha noise - sigma x0, or the noise itself."""
        return schedule.v_target(x0, noise, t, self.abar) if self.prediction == "v" else noise

    def per_sample_mse(self, net, batch, t, noise):
        """||target_i - out_i||^2 / (C H W) for each sample. batch: latents, context, pooled, time_ids."""
        x0 = batch["latents"]
        z = self.noised(x0, noise, t)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        target = self.target(x0, noise, t)
        with self.autocast:
            out = net(z, t, batch["context"], model.build_y(batch["pooled"], batch["time_ids"]))
        return (out.float() - target).pow(2).mean(dim=(1, 2, 3))  # (B,)

    def weight(self, t):
        """m(t) per sample (float32 on t's device)."""
        return schedule.loss_weight(t, self.abar, self.weighting, self.k, self.gamma)

    def __call__(self, net, batch, t, noise):
        """The loss mean_i m(t_i) mse_i, and the per-sample unweighted MSE (for the per-t-bin log)."""
        mse = self.per_sample_mse(net, batch, t, noise)
        return (self.weight(t) * mse).mean(), mse

    @torch.no_grad()
    def eval_bins(self, net, batches):
        """Held-out target-MSE per t-bin: every batch (one per bucket) at the EVAL_T timesteps with fixed noise,
        so that evals at different steps are comparable."""
        g = torch.Generator().manual_seed(0)
        sums, n = torch.zeros(10), 0
        for batch in batches:
            shape = batch["latents"].shape
            n += shape[0]
            for i, t_val in enumerate(EVAL_T.tolist()):
                noise = torch.randn(shape, generator=g).to(batch["latents"].device)
                t = torch.full((shape[0],), t_val, dtype=torch.long, device=noise.device)
                sums[i // 3] += self.per_sample_mse(net, batch, t, noise).sum().item()
        return (sums / (3 * n)).tolist()
