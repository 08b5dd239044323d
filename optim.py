"""
The optimizers, built as nanoGPT's configure_optimizers (train.py and bench.py alike), and the EMA.
FlatAdamW8bit is bitsandbytes' 8-bit AdamW (Dettmers et al. 2022, arXiv 2110.02861) over a few flat buffers, bitwise
equal to bnb.optim.AdamW8bit; docs/maths.md §8 explains the layout, §7 the stochastic rounding of bf16 weights.
"""
import contextlib
import logging

import torch
from torch.distributed.tensor import DTensor

from sharding import full, like, local


def stochastic_round_bf16(x, generator=None):
    """fp32 -> bf16, rounding up or down with probability proportional to closeness, so E[out] = x.
    bf16 is the top half of fp32's bits: add uniform noise to the 16 bits that are cut, then truncate."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # exact: low bits are zero


BNB_BLOCK = 256  # bitsandbytes' blockwise 8-bit state: one absmax per 256 consecutive elements
BNB_MIN_8BIT = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep 32-bit state
NORM_ROW = 1 << 16  # grad_norm sums each flat buffer in rows of this many elements, then the row norms
CHUNK_CUDA, CHUNK_CPU = 1 << 26, 1 << 20  # elements per kernel call (CPU: temporaries that stay in cache)


class FlatAdamW8bit(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit (the same kernels and numbers) over one flat buffer per (param group, 8/32-bit state)
    instead of 1680 per-tensor calls, each followed by a device sync (docs/maths.md §8). Parameters and grads become
    views on 256-element block boundaries (the blocks bnb forms per tensor) that keep their memory format; bf16
    weights are updated in fp32 a chunk at a time and stochastically rounded. Under FSDP the parameter buffer is a
    copy of this process's shards, refreshed before and written back after each step (docs/scaling.md §3).
    Contract: build it after the model's last .to(); parameters that get no gradient see a zero one (Adam's
    momentum still moves them; bnb would skip them); a grad replaced by assignment is copied into the buffer."""

    def __init__(self, groups, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, seed=0):
        # on CPU, bitsandbytes warns at import that its 4-bit matmul kernels are missing; nothing here uses them
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        import bitsandbytes.functional as bnbF
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0))
        self.bnbF, self.seed, self.n_steps, self.sr_gen = bnbF, seed, 0, None
        self.chunk = 0  # elements per kernel call, whole 256-blocks; 0: CHUNK_CUDA or CHUNK_CPU by device
        self.buffers = [self._flatten(gi, ps, eight) for gi, group in enumerate(self.param_groups)
                        for eight in (True, False)
                        if (ps := [p for p in group["params"] if (p.numel() >= BNB_MIN_8BIT) == eight])]
        dev = self.buffers[0]["p"].device if self.buffers else "cpu"
        self.qmap1 = bnbF.create_dynamic_map(signed=True).to(dev)  # bnb's "dynamic" map: first moment
        self.qmap2 = bnbF.create_dynamic_map(signed=False).to(dev)  # "udynamic": second moment

    @torch.no_grad()
    def _flatten(self, gi, ps, eight):
        sharded = isinstance(ps[0], DTensor)
        shards = [local(p) for p in ps]  # what this process updates
        dev, dt = shards[0].device, shards[0].dtype
        offsets, n = [], 0
        for t in shards:
            assert t.device == dev and t.dtype == dt, "one device and dtype per parameter group"
            assert t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last), "dense parameters only"
            offsets.append(n)
            n += -(-t.numel() // BNB_BLOCK) * BNB_BLOCK
        flat_p, flat_g = torch.zeros(n, dtype=dt, device=dev), torch.zeros(n, dtype=dt, device=dev)
        views = [flat_p.as_strided(t.shape, t.stride(), o).copy_(t) for t, o in zip(shards, offsets)]
        for p, t, o, view in zip(ps, shards, offsets, views):
            if not sharded:  # the parameter itself moves into the buffer (its old storage is freed)
                p.data = view
            p.grad = like(p, flat_g.as_strided(t.shape, t.stride(), o))  # FSDP's reduce-scatter adds into a DTensor
        buf = {"group": gi, "p": flat_p, "g": flat_g, "params": ps, "grads": [p.grad for p in ps], "sharded": sharded,
               "views": views, "ptrs": [p.data_ptr() for p in ps]}
        state = torch.uint8 if eight else torch.float32  # the 8-bit state carries one fp32 absmax per block
        buf.update(state1=torch.zeros(n, dtype=state, device=dev), state2=torch.zeros(n, dtype=state, device=dev))
        if eight:
            buf.update(absmax1=torch.zeros(n // BNB_BLOCK, device=dev), absmax2=torch.zeros(n // BNB_BLOCK, device=dev))
        return buf

    def _check(self, buf):
        for p, g, ptr in zip(buf["params"], buf["grads"], buf["ptrs"]):
            if not buf["sharded"] and p.data_ptr() != ptr:
                raise RuntimeError(f"parameter {tuple(p.shape)} no longer lives in the optimizer's flat buffer (was "
                                   "the model moved or cast after configure_optimizer?): build the optimizer last")
            if p.grad is not g:  # assigned, or recreated after someone set it to None: take its values
                local(g).copy_(local(p.grad) if p.grad is not None else 0)
                p.grad = g

    @torch.no_grad()
    def grad_norm(self):
        """The global L2 norm of all grads (over all processes under FSDP), a 0-d fp32 device tensor, no host sync;
        a norm of fp32 row norms: one sum over a buffer is 1.8e-2 low at 158M elements (docs/performance.md §5)."""
        sq = torch.zeros((), device=self.qmap1.device)
        for buf in self.buffers:
            self._check(buf)
            g = buf["g"]
            m = g.numel() // NORM_ROW * NORM_ROW
            rows = torch.linalg.vector_norm(g[:m].view(-1, NORM_ROW), dim=1, dtype=torch.float32)
            sq = sq + rows.square().sum() + torch.linalg.vector_norm(g[m:], dtype=torch.float32).square()
        if any(buf["sharded"] for buf in self.buffers):
            torch.distributed.all_reduce(sq)
        return sq.sqrt()

    def _update(self, buf, p, g, lo, hi, gnorm_scale):
        """One bitsandbytes kernel call over elements [lo, hi) of a buffer (p, g: those elements)."""
        group = self.param_groups[buf["group"]]
        beta1, beta2 = group["betas"]
        s1, s2 = buf["state1"][lo:hi], buf["state2"][lo:hi]
        if "absmax1" in buf:  # lo, hi are block aligned
            a, b = lo // BNB_BLOCK, hi // BNB_BLOCK
            self.bnbF.optimizer_update_8bit_blockwise(
                "adam", g, p, s1, s2, beta1, beta2, 0.0, 0.0, group["eps"], self.n_steps, group["lr"], self.qmap1,
                self.qmap2, buf["absmax1"][a:b], buf["absmax2"][a:b], group["weight_decay"], gnorm_scale=gnorm_scale)
        else:
            self.bnbF.optimizer_update_32bit("adam", g, p, s1, beta1, group["eps"], self.n_steps, group["lr"], s2,
                                            beta2, 0.0, 0.0, group["weight_decay"], gnorm_scale)

    @torch.no_grad()
    def step(self, closure=None, gnorm_scale=1.0):
        """gnorm_scale: the grad-clip factor (from grad_norm()), applied by the kernels as they read each grad. A
        Python float: bitsandbytes' op takes a float, and a device tensor would cost a host sync of its own."""
        assert closure is None, "no closure"
        self.n_steps += 1
        for buf in self.buffers:
            self._check(buf)
            p, g = buf["p"], buf["g"]
            if p.dtype == torch.bfloat16 and self.sr_gen is None:
                self.sr_gen = torch.Generator(device=p.device).manual_seed(self.seed)
            chunk = self.chunk or (CHUNK_CUDA if p.is_cuda else CHUNK_CPU)
            if buf["sharded"]:  # the shards may have been written since (a load, an EMA swap): start from them
                torch._foreach_copy_(buf["views"], [q.to_local() for q in buf["params"]])
            for lo in range(0, p.numel(), chunk):
                hi = min(p.numel(), lo + chunk)
                if p.dtype == torch.bfloat16:  # the update in fp32 on a copy, written back stochastically rounded
                    q = p[lo:hi].float()
                    self._update(buf, q, g[lo:hi].float(), lo, hi, gnorm_scale)
                    p[lo:hi] = stochastic_round_bf16(q, self.sr_gen)
                else:
                    self._update(buf, p[lo:hi], g[lo:hi], lo, hi, gnorm_scale)
            if buf["sharded"]:
                torch._foreach_copy_([q.to_local() for q in buf["params"]], buf["views"])

    @torch.no_grad()
    def zero_grad(self, set_to_none=True):
        """Zero the flat grad buffers (one fill each); grads stay views, whatever set_to_none says."""
        for buf in self.buffers:
            self._check(buf)
            buf["g"].zero_()

    def _layout(self):  # under FSDP: this process's shard sizes, so another process count does not fit
        return [[buf["group"]] + [local(p).numel() for p in buf["params"]] for buf in self.buffers]

    def state_dict(self):
        keys = ("state1", "state2", "absmax1", "absmax2")
        return {"n_steps": self.n_steps, "layout": self._layout(),
                "buffers": [{k: buf[k] for k in keys if k in buf} for buf in self.buffers],
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
                "sr_gen": self.sr_gen.get_state() if self.sr_gen is not None else None}

    @torch.no_grad()
    def load_state_dict(self, sd):
        if sd.get("layout") != self._layout():
            raise ValueError("optimizer state was saved for a different set of parameters (layout differs)")
        for buf, saved in zip(self.buffers, sd["buffers"]):
            for k, v in saved.items():
                buf[k].copy_(v)
        for group, saved in zip(self.param_groups, sd["param_groups"]):
            group.update(saved)
        self.n_steps = sd["n_steps"]
        if sd["sr_gen"] is not None:
            self.sr_gen = torch.Generator(device=self.buffers[0]["p"].device)
            self.sr_gen.set_state(sd["sr_gen"])


class Adafactor(torch.optim.Adafactor):
    """torch.optim.Adafactor (Shazeer & Stern 2018, arXiv 1804.04235; torch's defaults, state and numbers), with
    its reductions written out of place so that FSDP's sharded DTensors can be stepped too: torch's own squares a
    norm over the sharded dim, still a partial sum on each process, in place, which DTensor refuses."""

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "no closure"
        for group in self.param_groups:
            params, grads, rows, cols, variances, steps = [], [], [], [], [], []
            self._init_group(group, params, grads, rows, cols, variances, steps)
            lr, (eps1, eps2), d, decay = group["lr"], group["eps"], group["d"], group["weight_decay"]
            for p, g, row, col, var, step in zip(params, grads, rows, cols, variances, steps):
                e1 = torch.finfo(p.dtype).eps if eps1 is None else eps1
                step += 1
                t = step.item()
                beta = t ** group["beta2_decay"]  # 1 - beta2_t
                alpha = max(eps2, full(p.norm(2)).item() / p.numel() ** 0.5) * min(lr, t ** -0.5)  # relative step
                if decay:
                    p.mul_(1 - lr * decay)
                if g.dim() > 1:  # the second moment factored into row and column means of g^2
                    row.lerp_(torch.norm(g, dim=-1, keepdim=True).square().div(g.size(-1)), beta)
                    col.lerp_(torch.norm(g, dim=-2, keepdim=True).square().div(g.size(-2)), beta)
                    v = (row @ col).div(row.mean(dim=-2, keepdim=True).clamp(min=e1))
                else:
                    v = var.lerp_(g * g, beta).clone()
                update = v.clamp(min=e1 * e1).rsqrt().mul(g)
                p.add_(update, alpha=-alpha / max(1.0, full(update.norm(2)).item() / (update.numel() ** 0.5 * d)))


OPTIMIZERS = ("adamw8bit", "adamw", "adafactor")


def configure_optimizer(params, name="adamw8bit", lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01,
                        fused=False, seed=0):
    """Decoupled weight decay on >= 2-D tensors (matmul/conv weights) only, as nanoGPT. adamw8bit: FlatAdamW8bit
    (build it after the model's last .to()); adamw: torch's; adafactor: torch's, also on FSDP shards (no betas)."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if name == "adamw8bit":
        return FlatAdamW8bit(groups, lr=lr, betas=betas, eps=eps, seed=seed)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    if name == "adafactor":
        return Adafactor(groups, lr=lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def clip_factor(opt, params, max_norm):
    """(the global grad norm, the clip factor still to apply), 0-d device tensors, no host sync. FlatAdamW8bit
    applies the factor in its step(gnorm_scale=...); the others' grads are clipped here and their factor is 1."""
    if isinstance(opt, FlatAdamW8bit):
        gnorm = opt.grad_norm()
        return gnorm, (max_norm / (gnorm + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s factor
    gnorm = full(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return gnorm, torch.ones_like(gnorm)


class EMA:
    """An exponential moving average of the weights (Polyak & Juditsky 1992) from the weights it is built with, in
    fp32 on `device` (the training device, or the CPU to spare its memory); under FSDP, of this process's shards."""

    def __init__(self, named_params, decay, device):
        self.names, self.params = zip(*named_params)
        self.decay = decay
        self.shadow = [local(p).detach().to(device=device, dtype=torch.float32, copy=True) for p in self.params]

    @torch.no_grad()
    def update(self):
        w = [local(p).detach().to(s.device, torch.float32) for p, s in zip(self.params, self.shadow)]
        torch._foreach_mul_(self.shadow, self.decay)  # two products, then the sum: the formula's own roundings
        torch._foreach_add_(self.shadow, torch._foreach_mul(w, 1 - self.decay))

    @contextlib.contextmanager
    def swapped(self):
        """The averaged weights in place of the model's (for an eval, a preview or an export); the model's own
        are put back bit for bit afterwards (their copy waits on the EMA's device)."""
        with torch.no_grad():
            saved = [local(p).to(s.device, copy=True) for p, s in zip(self.params, self.shadow)]
            for p, s in zip(self.params, self.shadow):
                local(p).copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    local(p).copy_(s)
