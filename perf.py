"""
The cost model of the UNet training step for MFU (docs/performance.md §1): model FLOPs per image, counted at the
real shape, and the dense bf16 peak of the GPUs we know; and the commit a measurement ran.
"""
import os
import subprocess

import torch

from model import UNet

# dense bf16 peak TFLOP/s; the first name found in the device name wins, so longer names come first
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0,
               "L40S": 362.0, "4090": 165.0, "A6000": 155.0, "L4": 121.0, "B200": 2250.0}


def peak_tflops(device_name):
    """Dense bf16 TFLOP/s for a CUDA device name, 0.0 when unknown (MFU is then not printed)."""
    return next((v for key, v in PEAK_TFLOPS.items() if key in device_name), 0.0)


def unet_flops(cfg, h, w, context_len=77):
    """Model FLOPs of one forward + backward of the UNet on one latent of (h, w) with a context of context_len
    positions (77 n for max_token_length = 75 n), without checkpointing (recomputation is not credited). Counted
    on the meta device, so nothing is allocated, and RNG-neutral, so counting mid-run leaves an exact resume exact."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        net = UNet(cfg)
        x, context = torch.randn(1, cfg.in_channels, h, w), torch.randn(1, context_len, cfg.context_dim)
        y, t = torch.randn(1, cfg.adm_in_channels), torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            net(x, t, context, y).sum().backward()
    return counter.get_total_flops()


def git_sha():
    """The commit of this checkout, recorded with every run and measurement; 'unknown' outside a git clone."""
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return "unknown"
