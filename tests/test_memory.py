"""
memory.py's parts against what they stand for, on the tiny UNet with real CPU tensors: MetaAutocast casts and
caches as torch.autocast does, the meta measurement with the flash stand-in saves what the real CPU flash kernel
saves, and the optimizer state formula is FlatAdamW8bit's allocation. (The full-size predictions: test_fullsize.py.)
"""
import torch

import memory
import model
import optim


def tiny_unet(dtype=torch.float32, device="cpu"):
    with torch.device(device):
        unet = model.UNet(model.SDXLConfig.tiny().unet)
    return unet.to(dtype).requires_grad_(True).train()


def sizes(saved):
    return sorted(n for n, _ in saved.values())


def test_meta_autocast_casts_as_autocast_does():
    # CPU autocast keeps layer_norm and group_norm in bf16 where CUDA's casts them to fp32: with the fp32 list
    # emptied, MetaAutocast must save exactly what CPU autocast saves (weight copies included)
    unet = tiny_unet()
    real, _, _ = memory.saved_activations(unet, 2, 16, 16, cast=torch.autocast("cpu", dtype=torch.bfloat16), device="cpu")
    ours, _, copies = memory.saved_activations(unet, 2, 16, 16, cast=memory.MetaAutocast(fp32=()), device="cpu")
    assert sizes(ours) == sizes(real)
    assert sum(copies.values()) > 0.5 * 2 * sum(p.numel() for p in unet.parameters())  # most weights were cast
    assert sum(n for k, (n, _) in ours.items() if k in copies) > 0  # and copies are saved for backward
    # the CUDA lists (layer_norm, group_norm in fp32) save more: fp32 copies of the norms' inputs
    cuda_like, _, _ = memory.saved_activations(unet, 2, 16, 16, device="cpu")
    assert sum(sizes(cuda_like)) > sum(sizes(real))


def test_meta_measure_with_flash_stand_in_matches_real_cpu_tensors():
    # the real CPU step (SDPA picks the CPU flash kernel) against the meta device with the stand-in: the same
    # saved storages; the meta default (math SDPA: T x T attention matrices) saves more
    plain = torch.autocast("cpu", enabled=False)
    real, inputs_real, _ = memory.saved_activations(tiny_unet(), 2, 16, 16, cast=plain, device="cpu")
    attention, model.attention = model.attention, memory.flash_attention
    try:
        meta, inputs_meta, _ = memory.saved_activations(tiny_unet(device="meta"), 2, 16, 16, cast=plain)
    finally:
        model.attention = attention
    math, _, _ = memory.saved_activations(tiny_unet(device="meta"), 2, 16, 16, cast=plain)
    assert sizes(meta) == sizes(real)
    assert sorted(n for _, n in inputs_meta) == sorted(n for _, n in inputs_real)
    assert sum(sizes(math)) > sum(sizes(meta))


def test_activation_bytes_with_checkpointing():
    # made-up storages: 2 blocks; block 0 saves 10 (+ its input 1), block 1 saves 30 (+ its input 2), 5 outside
    saved = {"a": (10, 0), "in0": (1, 0), "b": (30, 1), "in1": (2, 1), "o": (5, -1), "w": (7, 1)}
    inputs = [("in0", 1), ("in1", 2)]
    assert memory.activation_bytes(saved, inputs, {"w": 7}, grad_ckpt=False) == 55
    assert memory.activation_bytes(saved, inputs, {"w": 7}, grad_ckpt=False, with_copies=False) == 48
    assert memory.activation_bytes(saved, inputs, {"w": 7}, grad_ckpt=True) == 5 + 1 + 2 + 37
    assert memory.activation_bytes(saved, inputs, {"w": 7}, grad_ckpt=True, with_copies=False) == 5 + 1 + 2 + 30


def test_state_bytes_are_what_the_optimizer_allocates():
    unet = model.init_random_(tiny_unet(), seed=0)
    opt = optim.configure_optimizer(unet.parameters(), "adamw8bit")
    allocated = sum(buf[k].nbytes for buf in opt.buffers for k in ("state1", "state2", "absmax1", "absmax2") if k in buf)
    assert memory.adamw8bit_state_bytes([p.numel() for p in unet.parameters()]) == allocated
    assert any(p.numel() < optim.BNB_MIN_8BIT for p in unet.parameters())  # both kinds of state are there


def test_context_follows_the_prompt_length():
    # --max_token_length 75 | 150 | 225 -> 77 | 154 | 231 context positions: what the cross-attention saves for
    # backward (K and V of the context, attention outputs' logsumexp aside) grows by the same bytes per 77 positions
    unet = tiny_unet(device="meta")
    total = lambda n: sum(b for b, _ in memory.saved_activations(unet, 2, 16, 16, context_len=n)[0].values())
    a, b, c = total(77), total(154), total(231)
    assert a < b < c and c - b == b - a, (a, b, c)
