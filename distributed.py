"""
One process or many: the process group torchrun asks for, the UNet prepared for the parallel layout and compiled
in the chosen scope, and the few collectives the training loop needs, behind one object so that train.py has no
`if sharded` branches. --parallel=ddp: a whole UNet per process (DistributedDataParallel); fsdp: weights, grads
and optimizer state sharded per UNet block (torch's FSDP2, sharding.py, docs/scaling.md).
--compile_scope (docs/performance.md §6): unet, the whole UNet one fullgraph per input shape (aspect bucket);
blocks, each ResBlock and TransformerBlock on its own: a few small graphs instead of one huge one, glue eager.
"""
import datetime
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import configurator
import model
import sharding

SCOPES = ("unet", "blocks")


def compiled_units(unet):
    """The repeated blocks that --compile_scope=blocks compiles on their own."""
    return [m for m in unet.modules() if isinstance(m, (model.ResBlock, model.TransformerBlock))]


def _make_room(n_units, n_shapes):
    """Inductor specialises the latent size (mark_dynamic on h, w fails with a ConstraintViolationError), so each
    bucket is a static graph of each compiled unit. Dynamo allows 8 graphs per function and, under fullgraph=True,
    the 9th would stop the run with FailOnRecompileLimitHit hours in: make room for all of them."""
    torch._dynamo.config.automatic_dynamic_shapes = False
    graphs = (n_shapes + 2) * n_units
    torch._dynamo.config.recompile_limit = max(8, graphs)
    torch._dynamo.config.accumulated_recompile_limit = max(256, 2 * graphs)


def compile_unet(unet, scope, n_shapes, **kwargs):
    """torch.compile the UNet for n_shapes input shapes (kwargs: fullgraph, backend, mode). Returns what to call: a
    compiled wrapper (scope unet) or the UNet itself with its blocks compiled in place (scope blocks)."""
    if scope == "unet":
        _make_room(1, n_shapes)
        return torch.compile(unet, **kwargs)
    _compile_each(compiled_units(unet), n_shapes, kwargs)
    return unet


def _compile_each(units, n_shapes, kwargs):
    """Each module compiled in place (the state dict keys never change)."""
    _make_room(len(units), n_shapes)
    for unit in units:
        unit.compile(**kwargs)


class Procs:
    """This process's place in the run: rank, local_rank, world, master; sharded (fsdp); device (cuda:LOCAL_RANK
    under torchrun on GPUs). Outside torchrun: one process, every collective a no-op."""

    def __init__(self, device, layout):
        self.on = int(os.environ.get("RANK", -1)) != -1
        self.sharded = layout == "fsdp"
        self.rank, self.local_rank, self.world, self.device, self.slow_group = 0, 0, 1, device, None
        if self.on:
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
            self.rank, self.local_rank, self.world = (int(os.environ[v]) for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
            if device.startswith("cuda"):
                self.device = f"cuda:{self.local_rank}"
                torch.cuda.set_device(self.device)
            # waits for another rank's slow setup (the demo's data, its share of the cache: hours) use a CPU group
            # with a long timeout, not the training group's minutes (the hang-up of diffusers issue #7960)
            self.slow_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
        self.master = self.rank == 0
        # eval, previews and export are rank 0's, but under fsdp every rank holds shards the forward needs
        self.joins_forward = self.master or self.sharded

    def wait(self):
        """Every rank waits here for slow setup work of another (data, vocabulary, cache)."""
        if self.on:
            dist.barrier(group=self.slow_group)

    def prepare(self, unet, compute_dtype, compile_kwargs, scope, n_shapes):
        """Before the optimizer is built (it steps the shards). ddp leaves the UNet whole (NHWC on a GPU: cuDNN's
        fast convolutions; FSDP shards contiguous weights only). fsdp shards it, gathered in compute_dtype, and
        compiles in place: a whole-UNet fullgraph cannot trace FSDP's hooks, so scope unet compiles each FSDP block."""
        if not self.sharded:
            if self.device.startswith("cuda"):
                unet.to(memory_format=torch.channels_last)
            return
        sharding.shard(unet, compute_dtype)
        if compile_kwargs is not None:
            units = sharding.blocks(unet) if scope == "unet" else compiled_units(unet)
            _compile_each(units, n_shapes, compile_kwargs)

    def wrap(self, unet, compile_kwargs, scope, n_shapes):
        """After the optimizer and the resume: what the loop calls. ddp: compiled and/or DDP-wrapped; fsdp: the
        sharded UNet as prepare() left it. `unet` itself stays the module that is saved and evaluated."""
        if self.sharded:
            return unet
        net = compile_unet(unet, scope, n_shapes, **compile_kwargs) if compile_kwargs is not None else unet
        if self.on:
            net = DDP(net, device_ids=[self.local_rank] if self.device.startswith("cuda") else None)
        return net

    def grad_sync(self, net, on):
        """Reduce gradients in this backward (the last micro-step of an accumulation) or keep them local."""
        if self.sharded:
            net.set_requires_gradient_sync(on)
        elif self.on:
            net.require_backward_grad_sync = on

    def all_ok(self, ok):
        """Every process takes the same skip decision: a bool tensor, True only where it is True on every rank."""
        if not self.on:
            return ok
        ok = ok.float()
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return ok.bool()

    def sum(self, t):
        """The sum over processes of a tensor (in place)."""
        if self.on:
            dist.all_reduce(t)
        return t

    def gather(self, obj):
        """Every rank's object on every rank, a list by rank."""
        if not self.on:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.on:
            dist.destroy_process_group()


class Signals:
    """SIGINT, SIGTERM and SIGHUP (a closed terminal or remote login): before the first step there is nothing to
    save, so the process stops at once (mid-compile too); from the first step on (training = True) the step is
    finished, the resume state written, and the run exits. Either way the exit status is 128 + the signal."""

    def __init__(self):
        self.received, self.training = None, False
        configurator.on_stop_signals(self.on_signal)  # (a SIGHUP ignored under nohup stays ignored)

    def on_signal(self, signum, frame):
        self.received = signum
        if not self.training:
            print(f"got signal {signum} before the first step: nothing to save, stopping", flush=True)
            raise SystemExit(128 + signum)
        print(f"got signal {signum}: writing a checkpoint after this step", flush=True)
