"""
The full-size SDXL UNet without a GPU, on the meta device (nothing allocated):
- (RUN_SLOW=1, several minutes on 2 cores) the compiled training step traces as train.py compiles it: fullgraph,
  forward and backward, at two bucket shapes, one graph per shape and none more when a shape comes back, with
  Dynamo configured as train.py configures it; with and without per-block checkpointing. AOTAutograd with the
  eager backend stands in for Inductor (which needs real tensors to generate code).
- the memory model (memory.py) puts the default mode (fp32 master + bf16, AdamW8bit, batch 4, 1024^2, no
  checkpointing) on an 80 GB card and the 24 GB mode (pure bf16 + SR, per-block checkpointing, batch 1) under
  bench.py's TARGET_24GB_GIB.

    RUN_SLOW=1 python -m pytest -q tests/test_fullsize.py
"""
import os
import re

import pytest
import torch

import memory
import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = ((128, 128), (104, 152))  # latents of the 1024x1024 and 832x1216 buckets


@pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="traces the full UNet twice per case; RUN_SLOW=1 runs it")
@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_full_unet_compiles_one_graph_per_bucket(grad_ckpt):
    from torch._dynamo.testing import CompileCounterWithBackend
    with torch.device("meta"):
        unet = model.UNet(model.UNetConfig())
    unet.grad_ckpt = grad_ckpt
    counter = CompileCounterWithBackend("aot_eager")
    graphs = len(SHAPES) + 2  # train.py: (buckets + 2), at least 8
    torch._dynamo.reset()
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=max(8, graphs),
                                    accumulated_recompile_limit=max(256, 2 * graphs)):
        net = torch.compile(unet, fullgraph=True, backend=counter)
        for i, (h, w) in enumerate(SHAPES + SHAPES[:1]):  # the first shape again: no new graph
            with torch.device("meta"):
                x, target = torch.randn(1, 4, h, w), torch.randn(1, 4, h, w)
                args = (torch.randint(0, 1000, (1,)), torch.randn(1, 77, 2048), torch.randn(1, 2816))
            (net(x, *args).float() - target).pow(2).mean().backward()
            assert all(p.grad is not None and p.grad.shape == p.shape for p in unet.parameters())
            assert counter.frame_count == min(i + 1, len(SHAPES)), (i, counter.frame_count)
            unet.zero_grad(set_to_none=True)
    torch._dynamo.reset()


def target_24gb():
    """bench.py's TARGET_24GB_GIB, read from its source (importing bench.py runs a bench)."""
    return float(re.search(r"^TARGET_24GB_GIB = ([\d.]+)", open(os.path.join(ROOT, "bench.py")).read(), re.M)[1])


def total_gib(precision, grad_ckpt, batch):
    unet = memory.unet_on_meta(precision)
    static = memory.static_bytes(unet, precision, "adamw8bit")
    attention, model.attention = model.attention, memory.flash_attention
    try:
        saved, inputs, copies = memory.saved_activations(unet, batch, 128, 128)
    finally:
        model.attention = attention
    act = memory.activation_bytes(saved, inputs, copies, grad_ckpt)
    act_fsdp = memory.activation_bytes(saved, inputs, copies, grad_ckpt, with_copies=False)
    return memory.per_gpu(static, act, act_fsdp, "ddp", 1, precision, "adamw8bit")


def test_memory_model_fits_the_default_mode_on_80gb():
    row = total_gib("amp", False, 4)
    assert row["weights"] == row["grads"] == pytest.approx(2_567_463_684 * 4 / 2**30)  # docs/performance.md §2
    assert row["total"] <= 80 - memory.headroom, row
    assert row["activations"] > 20, row  # batch 4 at 1024^2 without checkpointing: tens of GiB, not a few


def test_memory_model_fits_the_24gb_mode():
    row = total_gib("bf16", True, 1)
    assert row["total"] <= target_24gb(), row
    assert row["weights"] + row["grads"] + row["optimizer"] == pytest.approx(14.43, abs=0.01), row  # §2's 14.43 GiB
