"""optim.configure_optimizer: the pure-bf16 mode keeps the updates that round-to-nearest loses (docs/maths.md §7)."""
import io

import bitsandbytes.functional as bnbF
import pytest
import torch

import model
import optim


def run(dtype, sr, steps=60, lr=1e-6):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(512, 256, generator=g)
    direction = torch.randn(512, 256, generator=g)
    p = torch.nn.Parameter(w0.clone().to(dtype))
    if sr:
        opt = optim.configure_optimizer([p], "adamw8bit", lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    else:  # plain bitsandbytes: round-to-nearest write-back in the parameter's dtype
        import bitsandbytes as bnb
        opt = bnb.optim.AdamW8bit([p], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(steps):
        p.grad = (direction + 0.5 * torch.randn(512, 256, generator=g)).to(dtype)
        opt.step()
    return p.detach().float() - w0.to(dtype).float()


def test_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 1.0 + 2 ** -10)  # 1/8 of the way from 1 to the next bf16, 1 + 2^-7
    r = optim.stochastic_round_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert abs(r.mean().item() - x[0].item()) < 2e-5
    assert torch.equal(optim.stochastic_round_bf16(torch.tensor([0.5, -2.0, 3.0])).float(), torch.tensor([0.5, -2.0, 3.0]))


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
        opt_cl = optim.configure_optimizer([cl], "adamw8bit", lr=1e-2, weight_decay=0.1)
        opt_ref = optim.configure_optimizer([ref], "adamw8bit", lr=1e-2, weight_decay=0.1)
        for gr in grads:
            cl.grad = gr.clone()  # a contiguous grad: the optimizer gives it the parameter's layout
            ref.grad = gr.permute(0, 2, 3, 1).contiguous()
            opt_cl.step()
            opt_ref.step()
        assert cl.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(cl.detach().permute(0, 2, 3, 1), ref.detach())
        assert not torch.equal(cl.detach(), w0)


def make_params(seed=2, dtype=torch.float32):
    # sizes on both sides of bnb's 4096-element 8-bit threshold, most not multiples of its 256 block
    g = torch.Generator().manual_seed(seed)
    shapes = [(300, 70), (64, 32, 3, 3), (4096,), (5000,), (10, 10), (77,), (33, 3, 1, 1), (9000, 3)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def drive(params, opt, steps, seed=3, first=0):
    """Steps first..steps-1 of a fixed grad sequence, lr and betas changed between steps as train.py's ramps do."""
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        grads = [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]
        if i < first:
            continue
        for group in opt.param_groups:
            group["lr"], group["betas"] = 1e-2 / (i + 1), (0.9 + 0.01 * i, 0.95 + 0.005 * i)
        for p, gr in zip(params, grads):
            p.grad = gr  # bnb takes it as it is; ours copies it into its flat grad buffer
        opt.step()
        opt.zero_grad()


def test_flat_buffers_give_bitsandbytes_numbers_exactly():
    import bitsandbytes as bnb
    ref = make_params()
    stock = bnb.optim.AdamW8bit([{"params": [p for p in ref if p.dim() >= 2], "weight_decay": 0.1},
                                 {"params": [p for p in ref if p.dim() < 2], "weight_decay": 0.0}], lr=1e-2)
    drive(ref, stock, 5)
    big = next(i for i, p in enumerate(ref) if p.numel() >= 4096 and p.dim() >= 2)
    n = ref[big].numel()
    for chunk in (0, 512):  # by device (one call per buffer here), and calls over two 256-blocks at a time
        ours = make_params()
        opt = optim.configure_optimizer(ours, "adamw8bit", lr=1e-2, weight_decay=0.1)
        opt.chunk = chunk
        drive(ours, opt, 5)
        assert len(opt.buffers) == 4  # (decay, no decay) x (8-bit, 32-bit state)
        for a, b in zip(ours, ref):
            assert torch.equal(a.detach(), b.detach()), (chunk, a.shape)
        buf = opt.buffers[0]  # the big tensor's 8-bit moments are bnb's too
        assert torch.equal(buf["state1"][:n], stock.state[ref[big]]["state1"].flatten())
        assert torch.equal(buf["absmax2"][:-(-n // 256)], stock.state[ref[big]]["absmax2"])


def test_one_kernel_call_per_buffer_and_views_that_autograd_fills(monkeypatch):
    cfg = model.SDXLConfig.tiny().unet
    unet = model.init_random_(model.UNet(cfg), seed=0).to(memory_format=torch.channels_last)
    ps = list(unet.parameters())
    opt = optim.configure_optimizer(ps, "adamw8bit")
    conv = unet.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    flat = {b["p"].untyped_storage().data_ptr() for b in opt.buffers}
    assert {p.untyped_storage().data_ptr() for p in ps} == flat and len(flat) == len(opt.buffers) >= 3
    z = torch.randn(1, cfg.in_channels, 8, 8)
    y = torch.randn(1, cfg.adm_in_channels)
    unet(z, torch.tensor([10]), torch.randn(1, 77, cfg.context_dim), y).square().mean().backward()
    assert all(p.grad is g for b in opt.buffers for p, g in zip(b["params"], b["grads"]))
    assert sum(b["g"].count_nonzero().item() for b in opt.buffers) > 0.9 * sum(p.numel() for p in ps)
    calls = []
    for name in ("optimizer_update_8bit_blockwise", "optimizer_update_32bit"):
        real = getattr(bnbF, name)
        monkeypatch.setattr(bnbF, name, lambda *a, real=real, **k: calls.append(a[0]) or real(*a, **k))
    before = conv.detach().clone()
    opt.chunk = 1 << 30  # one chunk per buffer, as on CUDA
    opt.step()
    assert len(calls) == len(opt.buffers) < len(ps) / 50, calls
    assert not torch.equal(conv.detach(), before) and conv.is_contiguous(memory_format=torch.channels_last)
    unet.to(torch.float64)
    with pytest.raises(RuntimeError, match="build the optimizer last"):  # a moved model is refused
        opt.step()


def test_state_dict_resumes_exactly_fp32_and_bf16():
    for dtype in (torch.float32, torch.bfloat16):
        straight = make_params(dtype=dtype)
        opt = optim.configure_optimizer(straight, "adamw8bit", lr=1e-2, seed=5)
        drive(straight, opt, 4, seed=7)
        first = make_params(dtype=dtype)
        opt1 = optim.configure_optimizer(first, "adamw8bit", lr=1e-2, seed=5)
        drive(first, opt1, 2, seed=7)
        saved = {"w": [p.detach().clone() for p in first], "opt": opt1.state_dict()}
        f = io.BytesIO()
        torch.save(saved, f)
        f.seek(0)
        saved = torch.load(f, weights_only=True)
        second = make_params(seed=99, dtype=dtype)  # other numbers: everything must come from the state
        for p, w in zip(second, saved["w"]):
            p.data.copy_(w)
        opt2 = optim.configure_optimizer(second, "adamw8bit", lr=1e-2, seed=0)
        opt2.load_state_dict(saved["opt"])
        drive(second, opt2, 4, seed=7, first=2)
        for a, b in zip(straight, second):
            assert torch.equal(a.detach(), b.detach()), (dtype, a.shape)
    with pytest.raises(ValueError, match="different set of parameters"):
        optim.configure_optimizer(make_params()[:3], "adamw8bit").load_state_dict(opt1.state_dict())


def test_compiled_training_steps_on_flat_views_match_eager():
    # Dynamo + AOTAutograd (aot_eager: no Inductor codegen, seconds on CPU) see parameters that alias one flat
    # buffer, and grads that must land in the flat grad buffer; two steps on each side must agree
    from dataclasses import replace
    cfg = replace(model.SDXLConfig.tiny().unet, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1))
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(2, 4, 8, 8, generator=g).contiguous(memory_format=torch.channels_last),
             torch.tensor([3, 999]), torch.randn(2, 77, cfg.context_dim, generator=g),
             torch.randn(2, cfg.adm_in_channels, generator=g))
    torch._dynamo.reset()
    sides = []
    for backend in (None, "aot_eager"):
        unet = model.init_random_(model.UNet(cfg), seed=0).to(memory_format=torch.channels_last)
        opt = optim.configure_optimizer(unet.parameters(), "adamw8bit", lr=1e-3)
        net = torch.compile(unet, fullgraph=True, backend=backend) if backend else unet
        for _ in range(2):
            net(*batch).square().mean().backward()
            opt.step()
            opt.zero_grad()
        sides.append(unet)
    for a, b in zip(sides[0].parameters(), sides[1].parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(sides[0].parameters(),
                                                      model.init_random_(model.UNet(cfg), seed=0).parameters()))


def test_gnorm_scale_is_scaling_the_grads_exactly():
    # the clip factor applied by the kernels (step(gnorm_scale=c)) against clip_grad_norm_'s way (grads times c,
    # then step()); c as train.py gets it, an fp32 value through .tolist(). fp32 weights: the kernels scale in fp32
    c = torch.tensor(0.3141592653589793).item()
    sides = []
    for how in ("kernel", "grads", "none"):
        ps = make_params()
        opt = optim.configure_optimizer(ps, "adamw8bit", lr=1e-2, weight_decay=0.1)
        g = torch.Generator().manual_seed(4)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g) * (c if how == "grads" else 1.0)
            opt.step(gnorm_scale=c) if how == "kernel" else opt.step()
        sides.append(ps)
    kernel, grads, unscaled = sides
    for a, b, u in zip(kernel, grads, unscaled):
        assert torch.equal(a.detach(), b.detach()), a.shape
    assert len({p.numel() >= optim.BNB_MIN_8BIT for p in kernel}) == 2  # both kernels (8-bit and 32-bit state)
    assert all(not torch.equal(a.detach(), u.detach()) for a, u in zip(kernel, unscaled))  # the factor did act


def test_grad_norm_is_the_global_norm():
    # buffers with padding (no shape here is a multiple of 256) and more than one NORM_ROW; autograd's grads,
    # then one grad replaced by assignment (grad_norm must see the new values, as step() would)
    ps = make_params() + [torch.nn.Parameter(torch.randn(3 * optim.NORM_ROW + 5, generator=torch.Generator().manual_seed(5)))]
    opt = optim.configure_optimizer(ps, "adamw8bit")
    assert any(buf["g"].numel() > optim.NORM_ROW for buf in opt.buffers)
    assert all(sum(p.numel() for p in buf["params"]) < buf["g"].numel() for buf in opt.buffers)
    sum(((i + 1) * p.float()).square().sum() for i, p in enumerate(ps)).backward()
    for replaced in (False, True):
        if replaced:
            ps[1].grad = torch.full_like(ps[1], 7.0)
        ours = opt.grad_norm()
        ref = torch.nn.utils.get_total_norm([p.grad for p in ps])
        exact = sum(p.grad.double().square().sum() for p in ps).sqrt()
        assert ours.dtype == torch.float32 and ours.dim() == 0
        # within 1e-6 of the exact norm; torch's own fp32 sum is ~1e-6 off it too, so 2e-6 between the two
        assert abs(ours.item() / exact.item() - 1) < 1e-6 and abs(ours.item() / ref.item() - 1) < 2e-6, (ours, ref, exact)
    assert any(ps[1].grad is g for b in opt.buffers for g in b["grads"])  # the assigned grad was taken in
    opt.zero_grad()
    assert opt.grad_norm().item() == 0


def test_adafactor_is_torchs_and_steps_shards():
    """optim.Adafactor is torch.optim.Adafactor's update written out of place (so DTensors can be stepped):
    on plain tensors the two give the same bits, weights and factored state, over 3 steps."""
    torch.manual_seed(0)
    cfg = model.SDXLConfig.tiny().unet
    a = model.init_random_(model.UNet(cfg), seed=0)
    b = model.UNet(cfg)
    b.load_state_dict(a.state_dict())
    groups = lambda m: [{"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": 0.01},
                        {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    theirs, ours = torch.optim.Adafactor(groups(a), lr=1e-2), optim.configure_optimizer(b.parameters(), "adafactor",
                                                                                          lr=1e-2, weight_decay=0.01)
    assert type(ours) is optim.Adafactor
    for _ in range(3):
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn_like(pa)
            pb.grad = pa.grad.clone()
        theirs.step()
        ours.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
        for key, v in theirs.state[pa].items():
            assert torch.equal(v, ours.state[pb][key]), key
