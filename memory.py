"""
The memory model of the UNet training step, per GPU (docs/performance.md §2): weights, grads and optimizer state
from the SDXL UNet's parameter list (built on the meta device: nothing is allocated), activations measured on the
meta device at the batch, resolution and checkpointing asked; for ddp (a whole UNet per GPU) and fsdp (weights,
grads and state divided by the GPU count) at 1, 2, 4 and 8 GPUs, and the cards each fits. Training never imports it.

    python memory.py                                                      # the default mode: amp, batch 4, 1024^2
    python memory.py --precision=bf16 --grad_ckpt=True --batch_size=1     # the 24 GB mode

Activations are what autograd saves for backward (saved-tensor hooks, each storage counted once, parameters
not), measured in one forward. Two things differ from a CUDA run and are handled here:
- torch.autocast does not act on meta tensors, so MetaAutocast casts as CUDA autocast does for the ops this UNet
  calls (bf16: linear, conv, attention; fp32: layer_norm, group_norm), weight copies cached for the forward as
  autocast caches them: the bf16 copies of the fp32 weights are then saved for backward and counted.
- on meta, scaled_dot_product_attention takes its math path and saves the T x T attention matrices, which no CUDA
  kernel (flash, cuDNN, memory-efficient) keeps; the CPU flash kernel, which has a meta kernel and saves what the
  CUDA flash kernel saves (the output and a logsumexp per row), stands in for it.
Not modelled: the grads of activations alive during backward (about one block's worth at a time), cuDNN and
cuBLAS workspaces, the CUDA context and the caching allocator's fragmentation: `headroom` is left for them.
"""
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

import configurator
import model
import objective
import optim
import schedule
import sharding
import tokenizer as clip_tokenizer

# -----------------------------------------------------------------------------
batch_size = 4  # images per GPU (train.py's per-process micro-batch)
resolution = 1024  # image side in pixels; latents are resolution/8 square
precision = "amp"  # amp: fp32 weights and grads, bf16 autocast | bf16: pure bf16 weights and grads (the 24 GB mode)
grad_ckpt = False  # per-block gradient checkpointing
max_token_length = 75  # 75 | 150 | 225: the text context has 77, 154 or 231 positions (docs/sdxl_format.md §8)
optimizer = "adamw8bit"  # adamw8bit (optim.FlatAdamW8bit) | adamw (torch: two moments in the weights' dtype)
gpus = (1, 2, 4, 8)  # process counts shown
cards = (24, 40, 48, 80, 141)  # card sizes in GB as sold; CUDA sees about as many GiB (an 80 GB H100: 79.6)
headroom = 3.0  # GiB left free on every card (CUDA context, allocator fragmentation, activation grads, workspaces)
# -----------------------------------------------------------------------------
FSDP_GATHERED = 2  # whole blocks held by FSDP2 at once: the one computing and the next, all-gathered ahead of it
GIB = 2 ** 30

LOWER = {F.linear, F.conv2d, F.scaled_dot_product_attention, torch.matmul, torch.bmm, torch.baddbmm, torch.addmm}
FP32 = {F.layer_norm, F.group_norm}


class MetaAutocast(TorchFunctionMode):
    """CUDA autocast's casts for the ops this UNet calls, by hand, so that they happen on meta tensors too: the
    inputs of LOWER ops go to `dtype`, those of FP32 ops to fp32. A weight (a leaf that requires grad) is cast once
    per forward and the copy reused, as autocast's cache does; `copies` holds those copies."""

    def __init__(self, dtype=torch.bfloat16, lower=LOWER, fp32=FP32):
        super().__init__()
        self.dtype, self.lower, self.fp32, self.copies = dtype, lower, fp32, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to = self.dtype if func in self.lower else torch.float32 if func in self.fp32 else None
        if to is not None:
            args, kwargs = tree_map(lambda t: self._cast(t, to), (args, kwargs))
        return func(*args, **kwargs)

    def _cast(self, t, to):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == to:
            return t
        if to == self.dtype and t.is_leaf and t.requires_grad:
            if id(t) not in self.copies:
                self.copies[id(t)] = t.to(to)
            return self.copies[id(t)]
        return t.to(to)


def flash_attention(q, k, v, heads, causal=False):
    """model.attention through the CPU flash kernel (it has a meta kernel): what a fused CUDA kernel saves."""
    B, T, C = q.shape
    q, k, v = (x.view(B, -1, heads, C // heads).transpose(1, 2) for x in (q, k, v))
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=causal)[0]
    return out.transpose(1, 2).reshape(B, T, C)


def storage(t):
    return t.untyped_storage()._cdata, t.untyped_storage().nbytes()


def saved_activations(unet, batch, h, w, cast=None, device="meta", context_len=77):
    """One forward of the training loss under `cast` (a MetaAutocast, by default one with CUDA autocast's casts;
    or any autocast context), recording what autograd saves for backward: {storage: (bytes, block)} (block: index
    into sharding.blocks(unet), -1 outside them), the (storage, bytes) of each block's input, and {storage: bytes}
    of a MetaAutocast's weight copies. Parameters are excluded."""
    cfg = unet.cfg
    params = {storage(p)[0] for p in unet.parameters()}
    saved, inputs, where = {}, [], [-1]

    def enter(i, args):  # (a pre-hook that returned something would replace the block's inputs)
        where[0] = i
        inputs.append(storage(args[0]))
    hooks = []
    for i, block in enumerate(sharding.blocks(unet)):
        hooks.append(block.register_forward_pre_hook(lambda m, args, i=i: enter(i, args)))
        hooks.append(block.register_forward_hook(lambda m, args, out: where.__setitem__(0, -1)))

    def pack(t):
        key, n = storage(t)
        if key not in params and key not in saved:
            saved[key] = (n, where[0])
        return t
    with torch.device(device):
        data = {"latents": torch.randn(batch, cfg.in_channels, h, w),
                "context": torch.randn(batch, context_len, cfg.context_dim),
                "pooled": torch.randn(batch, cfg.adm_in_channels - 6 * model.TIME_ID_DIM),
                "time_ids": torch.randn(batch, 6)}
        t, noise = torch.randint(0, 1000, (batch,)), torch.randn(batch, cfg.in_channels, h, w)
    cast = MetaAutocast() if cast is None else cast
    loss_fn = objective.Objective(schedule.alphas_cumprod(0.024, True).to(device), autocast=cast)  # train.py's loss
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn(unet, data, t, noise)
    finally:
        for hook in hooks:
            hook.remove()
    copies = dict(storage(c) for c in getattr(cast, "copies", {}).values())
    return saved, inputs, copies


def activation_bytes(saved, inputs, copies, grad_ckpt, with_copies=True):
    """Activation bytes held at the end of the forward (no checkpointing), or with per-block checkpointing the most
    held while one block is recomputed in backward: what is saved outside the blocks, every block's input (kept
    for the recompute) and the largest block's own saved tensors. with_copies=False leaves out autocast's weight
    copies (under fsdp the blocks are gathered in bf16, and their storage is freed after each block)."""
    keep = {k: (n, b) for k, (n, b) in saved.items() if with_copies or k not in copies}
    if not grad_ckpt:
        return sum(n for n, _ in keep.values())
    block_inputs = dict(inputs)
    outside = sum(n for k, (n, b) in keep.items() if b < 0 and k not in block_inputs)
    per_block = {}
    for k, (n, b) in keep.items():
        if b >= 0 and k not in block_inputs:
            per_block[b] = per_block.get(b, 0) + n
    return outside + sum(block_inputs.values()) + max(per_block.values(), default=0)


def adamw8bit_state_bytes(numels):
    """optim.FlatAdamW8bit's state: every tensor padded to whole 256-element blocks; tensors of >= 4096 elements
    keep two 1-byte moments and one fp32 absmax per moment per block, smaller ones two fp32 moments."""
    padded = lambda n: -(-n // optim.BNB_BLOCK) * optim.BNB_BLOCK
    return sum(2 * padded(n) + 8 * padded(n) // optim.BNB_BLOCK if n >= optim.BNB_MIN_8BIT else 8 * padded(n)
               for n in numels)


def static_bytes(unet, precision, optimizer):
    """Weights, grads (in the weights' dtype: the flat optimizer's grad buffer lives through the forward too) and
    optimizer state of the whole UNet, in bytes; plus the largest FSDP group's parameter count."""
    numels = [p.numel() for p in unet.parameters()]
    wbytes = 4 if precision == "amp" else 2
    state = adamw8bit_state_bytes(numels) if optimizer == "adamw8bit" else 2 * wbytes * sum(numels)
    largest = max(sum(p.numel() for p in block.parameters()) for block in sharding.blocks(unet))
    return {"params": sum(numels), "tensors": len(numels), "weights": wbytes * sum(numels),
            "grads": wbytes * sum(numels), "state": state, "largest_block": largest}


def per_gpu(static, act, act_fsdp, parallel, n, precision, optimizer):
    """GiB per GPU: weights, grads, optimizer (state, + under fsdp the flat optimizer's copy of this GPU's weight
    shards), comm (fsdp: gathered bf16 blocks; ddp across GPUs: DDP's gradient buckets, a second copy of the grads),
    activations and their total. The optimizer's bf16-mode temporaries (fp32 copies of one chunk and the rounding
    noise) live only during the step, when the activations are gone: the larger of the two counts."""
    shard = n if parallel == "fsdp" else 1
    weights, grads, state = static["weights"] / shard, static["grads"] / shard, static["state"] / shard
    if parallel == "fsdp" and optimizer == "adamw8bit":
        state += weights
    if parallel == "fsdp":
        comm = FSDP_GATHERED * static["largest_block"] * 2
    else:
        comm = static["grads"] if n > 1 else 0
    step_temps = 4 * 4 * optim.CHUNK_CUDA if precision == "bf16" and optimizer == "adamw8bit" else 0
    activations = act_fsdp if parallel == "fsdp" else act
    row = {"weights": weights, "grads": grads, "optimizer": state, "comm": comm, "activations": activations}
    row["total"] = weights + grads + state + comm + max(activations, step_temps)
    return {k: v / GIB for k, v in row.items()}


def fits(total_gib, cards, headroom):
    return [c for c in cards if total_gib <= c - headroom]


def unet_on_meta(precision):
    with torch.device("meta"):
        unet = model.UNet(model.UNetConfig())
    return unet.to(torch.float32 if precision == "amp" else torch.bfloat16).requires_grad_(True).train()


def report(batch_size, resolution, precision, grad_ckpt, optimizer, gpus, cards, headroom, max_token_length=75):
    """The table (markdown) and the lines above it, as one string."""
    unet = unet_on_meta(precision)
    static = static_bytes(unet, precision, optimizer)
    side = resolution // 8
    real_attention, model.attention = model.attention, flash_attention
    try:
        positions = clip_tokenizer.context_positions(max_token_length)
        saved, inputs, copies = saved_activations(unet, batch_size, side, side, context_len=positions)
    finally:
        model.attention = real_attention
    act = activation_bytes(saved, inputs, copies, grad_ckpt)
    act_fsdp = activation_bytes(saved, inputs, copies, grad_ckpt, with_copies=False)
    lines = [f"SDXL UNet, {static['params']:,} parameters in {static['tensors']} tensors; {precision} "
             f"({'fp32 weights and grads' if precision == 'amp' else 'bf16 weights and grads'}, bf16 autocast), "
             f"{optimizer}, batch {batch_size} per GPU at {resolution}x{resolution}, grad_ckpt {grad_ckpt}" +
             (f", prompts of {max_token_length} tokens" if max_token_length != 75 else ""),
             f"activations (measured on meta): {act / GIB:.2f} GiB, of which autocast's bf16 weight copies "
             f"{(act - act_fsdp) / GIB:.2f} GiB (of {sum(copies.values()) / GIB:.2f} GiB made: a weight whose input "
             f"needs no grad is not saved; fsdp gathers its blocks in bf16 and makes none)",
             f"GiB per GPU; a card fits when the total is at most its size less {headroom:g} GiB",
             "", "| parallel | GPUs | weights | grads | optimizer | gathered blocks / DDP buckets | activations "
                 "| total | fits (GB cards) |", "|---|---|---|---|---|---|---|---|---|"]
    for parallel in ("ddp", "fsdp"):
        for n in gpus:
            r = per_gpu(static, act, act_fsdp, parallel, n, precision, optimizer)
            ok = ", ".join(map(str, fits(r["total"], cards, headroom))) or "none"
            lines.append(f"| {parallel} | {n} | {r['weights']:.2f} | {r['grads']:.2f} | {r['optimizer']:.2f} | "
                         f"{r['comm']:.2f} | {r['activations']:.2f} | {r['total']:.2f} | {ok} |")
    return "\n".join(lines)


if __name__ == "__main__":
    config = configurator.configure(globals())
    configurator.check(config, choices={"precision": ("amp", "bf16"), "optimizer": ("adamw8bit", "adamw"),
                                        "max_token_length": clip_tokenizer.MAX_TOKEN_LENGTHS},
                       at_least={"batch_size": 1, "resolution": 32, "headroom": 0})
    if resolution % 32:
        raise configurator.UserError(f"config error: --resolution={resolution} must be a multiple of 32")
    print(report(batch_size, resolution, precision, grad_ckpt, optimizer, gpus, cards, headroom, max_token_length))
