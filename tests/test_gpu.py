"""GPU-only: the full-size SDXL UNet (random weights) against diffusers at 1024x1024, plus forward+backward cost.

Skipped without CUDA. On a GPU machine: `python -m pytest -q -s tests/test_gpu.py` prints a small table.
"""
import time

import pytest
import torch

import model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_full_unet_parity_and_cost():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from sgm_oracle import unet_kwargs
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 comparison
    torch.backends.cudnn.allow_tf32 = False
    cfg = model.UNetConfig()
    with torch.device(dev):
        ours = model.UNet(cfg)
    model.init_random_(ours, seed=0)
    kw = unet_kwargs(cfg)
    with torch.device(dev):
        theirs = diffusers.UNet2DConditionModel(**kw)
    theirs.load_state_dict(convert_ldm_unet_checkpoint({model.PREFIX["unet"] + k: v for k, v in ours.state_dict().items()}, kw))
    g = torch.Generator(dev).manual_seed(0)
    B = 2
    x = torch.randn(B, 4, 128, 128, device=dev, generator=g)
    t = torch.tensor([999, 421], device=dev)
    ctx = torch.randn(B, 77, 2048, device=dev, generator=g)
    pooled = torch.randn(B, 1280, device=dev, generator=g)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * B, device=dev)
    rows = []
    with torch.no_grad():
        a = ours(x, t, ctx, model.build_y(pooled, time_ids))
        b = theirs(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        rows.append(("fp32 ours vs diffusers", rel(a, b)))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            a16 = ours(x, t, ctx, model.build_y(pooled, time_ids))
            b16 = theirs(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        rows.append(("bf16 ours vs fp32 diffusers", rel(a16, b)))
        rows.append(("bf16 diffusers vs fp32 diffusers", rel(b16, b)))
    assert rows[0][1] < 1e-4, rows
    assert rows[1][1] < 5e-2 and rows[1][1] < 2 * rows[2][1] + 1e-3, rows  # no worse than diffusers' own bf16
    del theirs
    torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    for bs in (1, 4):  # eager forward+backward, fp32 weights + bf16 autocast
        xb, cb = torch.randn(bs, 4, 128, 128, device=dev), torch.randn(bs, 77, 2048, device=dev)
        yb, tb = torch.randn(bs, 2816, device=dev), torch.randint(0, 1000, (bs,), device=dev)
        torch.cuda.reset_peak_memory_stats()
        for i in range(4):
            if i == 1:
                torch.cuda.synchronize()
                t0 = time.time()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ours(xb, tb, cb, yb).float().pow(2).mean().backward()
        torch.cuda.synchronize()
        ms = (time.time() - t0) / 3 * 1000
        ours.zero_grad(set_to_none=True)
        rows.append((f"eager fwd+bwd batch {bs} ms", ms))
        rows.append((f"eager fwd+bwd batch {bs} peak GiB", torch.cuda.max_memory_allocated() / 2 ** 30))
    print("\n| check | value |\n|---|---|")
    for name, v in rows:
        print(f"| {name} | {v:.3g} |")
