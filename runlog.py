"""
What a training run prints and records: every log_interval steps one line (loss, lr, Adam betas, grad norm,
img/s, ms/it, MFU, memory, ETA) and the MSE per t-bin; the held-out eval (eval.jsonl); the same, and the previews,
to wandb or TensorBoard (out_dir/tensorboard/) when asked. The interval's sums stay on the device (the step never
waits for the host) and are summed over processes at each line: the global batch's, not rank 0's share.
"""
import json
import os
import time
from contextlib import contextmanager

import torch

import perf


class RunLog:
    def __init__(self, procs, unet_cfg, T, peak_tflops, max_iters, log_interval, out_dir, context_len=77,
                 wandb_run=None, tensorboard=False):
        """wandb_run: (project, run name, config) to log to wandb; tensorboard: write event files."""
        self.procs, self.cfg, self.T, self.peak, self.context_len = procs, unet_cfg, T, peak_tflops, context_len
        self.max_iters, self.interval, self.out_dir, self.device = max_iters, log_interval, out_dir, procs.device
        self.cuda, self.tb, self.wandb = self.device.startswith("cuda"), None, None
        if tensorboard and procs.master:  # (preflight checked that the package is there)
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        if wandb_run and procs.master:  # (lazy: an optional package)
            import wandb
            project, name, config = wandb_run
            self.wandb = wandb.init(project=project, name=name, config=config)
        self.flops_per_image = {}  # (h, w) of the latents -> model FLOPs of one image's forward + backward
        self.reset()

    def reset(self):
        """A new interval: zero sums, and the clock and the peak-memory counter restarted (the peak printed is the
        interval's steps', not the cache build's)."""
        zeros = lambda *shape: torch.zeros(shape, device=self.device)
        self.loss, self.n, self.bins, self.bin_n, self.imgs, self.flops = zeros(), 0, zeros(10), zeros(10), 0, 0.0
        self.sync()
        self.t0 = time.time()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def paused(self):
        """Time spent inside (a checkpoint, an eval, previews) is left out of the interval's img/s and ms/it."""
        self.sync()
        t = time.time()
        try:
            yield
        finally:
            self.sync()
            self.t0 += time.time() - t

    def add_batch(self, t, mse, latent_hw):
        """One micro-step's timesteps and per-sample MSE (this process's share of the global batch)."""
        b, world = len(t), self.procs.world
        t_bin = (t // (self.T // 10)).clamp(max=9)
        self.bins.index_add_(0, t_bin, mse.float())
        self.bin_n.index_add_(0, t_bin, torch.ones(b, device=self.device))
        self.imgs += b * world
        if latent_hw not in self.flops_per_image:
            self.flops_per_image[latent_hw] = perf.unet_flops(self.cfg, *latent_hw, context_len=self.context_len)
        self.flops += b * world * self.flops_per_image[latent_hw]

    def add_step(self, loss):
        """A step that was taken (skipped steps count in img/s, not in the loss)."""
        self.loss += loss
        self.n += 1

    def line(self, step, lr, betas, gnorm, skipped):
        """The interval's line after `step` steps, then a new interval."""
        self.sync()
        elapsed = time.time() - self.t0
        if self.procs.on:
            sums = self.procs.sum(torch.cat([self.loss.view(1), self.bins, self.bin_n]))
            self.loss, self.bins, self.bin_n = sums[0] / self.procs.world, sums[1:11], sums[11:]  # (n: same everywhere)
        if self.procs.master:
            ips = self.imgs / elapsed
            mfu = f"{100 * self.flops / elapsed / (self.peak * 1e12):.1f}%" if self.peak else "-"
            mem = f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.1f}GiB" if self.cuda else "-"
            eta = (self.max_iters - step) * elapsed / self.interval
            bins, bin_n = (self.bins / self.bin_n.clamp(min=1)).tolist(), self.bin_n.tolist()
            loss = self.loss.item() / self.n if self.n else float("nan")
            shown = f"{loss:.5f}" if self.n else "- (every step skipped)"
            print(f"iter {step}: loss {shown}, lr {lr:.3g}, betas ({betas[0]:.4f}, {betas[1]:.4f}), gnorm "
                  f"{gnorm.item():.3g}, {ips:.2f} img/s, {1000 * elapsed / self.interval:.0f} ms/it, mfu {mfu}, "
                  f"mem {mem}, skipped {skipped}, eta {eta / 60:.1f} min")
            print("  t-bin mse " + " ".join(f"{v:.4f}" if n else "-" for v, n in zip(bins, bin_n)))
            scalars = {"loss": loss, "lr": lr, "img_s": ips, **{f"mse_bin{i}": v for i, v, n in zip(
                range(10), bins, bin_n) if n}}
            if self.wandb:
                self.wandb.log({"iter": step, **scalars})
            self.scalars("train", scalars, step)
        self.reset()

    def eval(self, step, target, bins):
        """The held-out per-t-bin MSE, printed and appended to out_dir/eval.jsonl (rank 0)."""
        if self.procs.master:
            print(f"eval iter {step}: held-out {target}-mse per t-bin " + " ".join(f"{v:.4f}" for v in bins))
            with open(os.path.join(self.out_dir, "eval.jsonl"), "a") as f:
                f.write(json.dumps({"iter": step, "target": target, "mse_bins": bins}) + "\n")
            self.scalars("eval", {f"mse_bin{i}": v for i, v in enumerate(bins)}, step)

    def scalars(self, group, values, step):
        if self.tb:
            for name, v in values.items():
                self.tb.add_scalar(f"{group}/{name}", v, step)
            self.tb.flush()

    def images(self, step, imgs):
        """A preview grid (N, 3, H, W) in [-1, 1] to TensorBoard."""
        if self.tb:
            self.tb.add_images("preview", (imgs.detach().float().cpu().clamp(-1, 1) + 1) / 2, step)
            self.tb.flush()
