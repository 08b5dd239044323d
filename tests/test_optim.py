"""model.configure_optimizer: the pure-bf16 mode keeps the updates that round-to-nearest loses (math.md §7)."""
import torch

import model


def run(dtype, sr, steps=60, lr=1e-6):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(512, 256, generator=g)
    direction = torch.randn(512, 256, generator=g)
    p = torch.nn.Parameter(w0.clone().to(dtype))
    if sr:
        opt = model.configure_optimizer([p], "adamw8bit", lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    else:  # plain bitsandbytes: round-to-nearest write-back in the parameter's dtype
        import bitsandbytes as bnb
        opt = bnb.optim.AdamW8bit([p], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(steps):
        p.grad = (direction + 0.5 * torch.randn(512, 256, generator=g)).to(dtype)
        opt.step()
    return p.detach().float() - w0.to(dtype).float()


def test_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 1.0 + 2 ** -10)  # 1/8 of the way from 1 to the next bf16, 1 + 2^-7
    r = model.stochastic_round_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert abs(r.mean().item() - x[0].item()) < 2e-5
    assert torch.equal(model.stochastic_round_bf16(torch.tensor([0.5, -2.0, 3.0])).float(), torch.tensor([0.5, -2.0, 3.0]))


def test_bf16_sr_moves_weights_like_fp32_masters():
    ref = run(torch.float32, sr=False)
    sr = run(torch.bfloat16, sr=True)
    nearest = run(torch.bfloat16, sr=False)
    slope = lambda d: (d * ref).sum().item() / (ref * ref).sum().item()  # projection on the fp32 update
    assert (ref != 0).float().mean() > 0.99
    assert (nearest != 0).float().mean() < 0.02 and abs(slope(nearest)) < 0.05, "round-to-nearest should lose them"
    assert 0.8 < slope(sr) < 1.2, slope(sr)
    # each element moves a whole bf16 ulp with probability update/ulp: few move, but the expected move is right
    assert (sr != 0).float().mean() > 10 * (nearest != 0).float().mean()


def test_channels_last_weights_keep_their_layout_and_update():
    # bitsandbytes' own update_step makes parameters contiguous; ours must not. The reference is a plain
    # contiguous parameter holding the same numbers in NHWC order: the same storage order, so the 8-bit
    # blockwise quantisation (blocks of 256 consecutive elements) sees the same blocks and must agree exactly.
    g = torch.Generator().manual_seed(1)
    for shape in ((8, 16, 3, 3), (64, 32, 3, 3)):  # 1152 elements: 32-bit state; 18432: 8-bit state
        w0 = torch.randn(shape, generator=g)
        grads = [torch.randn(shape, generator=g) for _ in range(3)]
        cl = torch.nn.Parameter(w0.clone().contiguous(memory_format=torch.channels_last))
        ref = torch.nn.Parameter(w0.permute(0, 2, 3, 1).contiguous())
        opt_cl = model.configure_optimizer([cl], "adamw8bit", lr=1e-2, weight_decay=0.1)
        opt_ref = model.configure_optimizer([ref], "adamw8bit", lr=1e-2, weight_decay=0.1)
        for gr in grads:
            cl.grad = gr.clone()  # a contiguous grad: the optimizer gives it the parameter's layout
            ref.grad = gr.permute(0, 2, 3, 1).contiguous()
            opt_cl.step()
            opt_ref.step()
        assert cl.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(cl.detach().permute(0, 2, 3, 1), ref.detach())
        assert not torch.equal(cl.detach(), w0)
