"""
The resume state: everything a bit-exact continuation of a run needs, written every ckpt_interval steps, at the
end and on SIGINT/SIGTERM, and read by --init_from=resume. --parallel=ddp (and one process): out_dir/ckpt.pt, one
file (UNet, optimizer, EMA, and the plain values: iteration, config, every rank's RNG and loader state); fsdp:
out_dir/ckpt/, a DCP folder of each rank's shards (sharding.py) with the plain values in ckpt/run.pt. Both are read
with torch.load(weights_only=True) and written atomically: a crash at any moment leaves the previous state whole.
"""
import os
import random

import numpy as np
import torch

import data
import files
import optim
import sharding
from configurator import UserError, UserFileNotFound


def ckpt_path(out_dir, sharded):
    return os.path.join(out_dir, "ckpt" if sharded else "ckpt.pt")


def read(out_dir, sharded):
    """The saved plain values (and, for ckpt.pt, the UNet and optimizer tensors, paged in lazily)."""
    path = ckpt_path(out_dir, sharded)
    if sharded:
        sharding.recover(path)
    if not os.path.exists(path):
        other = ckpt_path(out_dir, not sharded)
        flag = "ddp" if sharded else "fsdp"
        hint = f" ({other} is there: resume with --parallel={flag})" if os.path.exists(other) else ""
        raise UserFileNotFound(f"--init_from=resume: there is no {path} to resume from{hint}")
    try:  # weights_only: plain containers and tensors, never code (a planted pickle fails here)
        if sharded:  # the plain values; the shards are read once the UNet is sharded
            ckpt = torch.load(os.path.join(path, "run.pt"), map_location="cpu", weights_only=True)
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        ckpt["base"], ckpt["iter_num"], ckpt["skipped"]
    except Exception as e:
        raise UserError(f"cannot resume: {path} is not a checkpoint this code wrote, or is damaged "
                        f"({type(e).__name__}); start a fresh run in another --out_dir") from None
    return ckpt


# the keys that define what a run trains: a resume must keep them, and the optimizer (check() names it); the others,
# such as lr and its schedule, max_iters, intervals and logging, may change, and the change is printed
IDENTITY = ("prediction", "beta_start", "beta_end", "zsnr", "weighting", "k", "gamma", "precision", "dtype",
            "max_token_length", "ema_decay", "ema_interval", "seed", "resolution", "bucket_step", "crop", "flip",
            "caption_dropout", "cache_dtype", "weight_decay", "adam_eps")
NOT_ADOPTED = ("init_from", "overwrite", "parallel", "out_dir")  # where the run is, not what it trains


def adopt(config, given, out_dir):
    """--init_from=resume: the saved config is the run's identity. A key not set on the command line or in a
    config file takes its saved value (not the default); a key that defines what is trained (IDENTITY) must equal
    its saved value, or one line names each such key with its saved and its new value. Returns the saved state."""
    saved = read(out_dir, config["parallel"] == "fsdp")
    old = saved["config"]
    for key, value in old.items():
        if key in config and key not in given and key not in NOT_ADOPTED:
            config[key] = value
    bad = [f"--{k} saved {old[k]!r}, now {config[k]!r}" for k in IDENTITY if k in old and k in config and
           old[k] != config[k] and not (k == "ema_decay" and old[k] == 0)]  # (an EMA may start at a resume)
    if bad:
        raise UserError(f"cannot resume {ckpt_path(out_dir, config['parallel'] == 'fsdp')} as another run: "
                        f"{'; '.join(bad)} (these define what is trained: resume without them, or start a fresh run "
                        f"in another --out_dir)")
    for k in sorted(given):
        if k in old and old[k] != config[k] and k not in NOT_ADOPTED:
            print(f"resume: {k} {old[k]!r} -> {config[k]!r}")
    return saved


def check(ckpt, path, config, world, global_batch):
    """A resume that cannot continue this run as configured (world processes, global_batch images per step): one
    line, before anything heavy. True when the run is complete but its export is missing or older than the
    checkpoint: only export it."""
    optimizer = config["optimizer"]
    if ckpt["config"]["optimizer"] != optimizer:
        raise UserError(f"cannot resume the {optimizer} optimizer from {path}: it holds "
                        f"{ckpt['config']['optimizer']} state; resume with --optimizer={ckpt['config']['optimizer']}")
    if config["parallel"] == "fsdp" and optimizer == "adamw8bit" and ckpt["world"] != world:
        raise UserError(f"{path} holds adamw8bit state for {ckpt['world']} processes, one buffer each: resume with "
                        f"{ckpt['world']} (adamw and adafactor state reshard to any count)")
    data.check_order(ckpt["per_rank"][0]["loader"], config["seed"], config["batch_size"] * world)
    if ckpt.get("global_batch", global_batch) != global_batch:
        raise UserError(f"{path} was trained at global batch {ckpt['global_batch']} (batch_size x accumulation x "
                        f"processes); this run's is {global_batch}: resume with the same global batch")
    if ckpt["iter_num"] >= config["max_iters"]:
        # a run stopped in its last step, or killed while exporting, still exports; one that exported does not
        model = os.path.join(config["out_dir"], "model.safetensors")
        if not os.path.exists(model) or os.path.getmtime(model) < os.path.getmtime(path):
            print(f"{path} is at iter {ckpt['iter_num']}, its export is missing or older: exporting it")
            return True
        raise UserError(f"{path} is at iter {ckpt['iter_num']} already: pass --max_iters above {ckpt['iter_num']} "
                        f"to train further")
    return False


def load_weights(ckpt, unet):
    """The UNet of ckpt.pt, before the optimizer is built on it (FSDP's shards are read by restore())."""
    if "unet" in ckpt:
        unet.load_state_dict(ckpt["unet"])


def rank_state(ckpt, procs):
    """This rank's RNG and loader state. The ranks' states are equal (one global draw, sliced), so another
    process count with the same global batch resumes exactly from rank 0's."""
    per_rank = ckpt["per_rank"]
    return per_rank[procs.rank] if len(per_rank) == procs.world else per_rank[0]


# -----------------------------------------------------------------------------
# random number generators: every state as tensors and plain values, so that the state loads with weights_only

def rng_state(device):
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    state = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.startswith("cuda") and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _shard_tensors(unet, opt, ema, rank):
    """The tensors of the FSDP resume state, each rank's shards (DCP writes and reads them in parallel): the
    UNet's, the optimizer's (adamw8bit's flat buffers under this rank's own key) and the EMA's."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    out = {"unet": unet.state_dict()}
    if isinstance(opt, optim.FlatAdamW8bit):
        sd = opt.state_dict()
        mine = {f"{i}.{key}": t for i, buf in enumerate(sd["buffers"]) for key, t in buf.items()}
        if sd["sr_gen"] is not None:
            mine["sr_gen"] = sd["sr_gen"]
        out["optimizer"] = {f"rank{rank}": mine}
    else:
        out["optimizer"] = get_optimizer_state_dict(unet, opt)["state"]
    if ema:
        out["ema"] = {name: sharding.like(p, s) for name, p, s in zip(ema.names, ema.params, ema.shadow)}
    return out


def save(path, procs, unet, opt, ema, plain, loader_state):
    """The resume state after plain["iter_num"] steps. plain: the run's plain values (config, base, counters);
    loader_state: the loader's state after the last batch the loop consumed."""
    mine = {"rng": rng_state(procs.device), "loader": loader_state}
    if procs.sharded and isinstance(opt, optim.FlatAdamW8bit):  # this rank's buffers go to DCP, their companions here
        sd = opt.state_dict()
        mine["optimizer"] = {"n_steps": sd["n_steps"], "layout": sd["layout"], "param_groups": sd["param_groups"],
                             "sr": sd["sr_gen"] is not None}
    plain = {**plain, "per_rank": procs.gather(mine), "world": procs.world, "ema": ema is not None}
    if procs.sharded:
        sharding.save_sharded(path, _shard_tensors(unet, opt, ema, procs.rank), plain, procs.master)
        if procs.master:
            print(f"saved {path}/ at iter {plain['iter_num']}")
    elif procs.master:
        state = {"unet": unet.state_dict(), "optimizer": opt.state_dict(), **plain}
        if ema:
            state["ema"] = dict(zip(ema.names, ema.shadow))
        size = sum(p.numel() * p.element_size() for p in unet.parameters()) * 2  # weights + state, roughly
        with files.atomic_path(path, size) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)  # through a Python file, so a full disk surfaces as the OSError it is
        print(f"saved {path} at iter {plain['iter_num']}")


def restore(ckpt, path, procs, unet, opt, ema, optimizer):
    """The optimizer and EMA state (and under fsdp the UNet's shards, every tensor read in place; another process
    count is resharded by DCP). An EMA switched on at resume starts from the resumed weights."""
    if not procs.sharded:
        try:
            opt.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:  # another optimizer, or another parameter set: one line, nothing written
            raise UserError(f"cannot resume the {optimizer} optimizer from {path}: its saved state is another "
                            f"optimizer's or for other parameters ({e!r})") from None
        if ema and "ema" in ckpt:
            for s, name in zip(ema.shadow, ema.names):
                s.copy_(ckpt["ema"][name])
        return
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    tensors = _shard_tensors(unet, opt, ema, procs.rank)
    if ema and not ckpt["ema"]:
        tensors.pop("ema")
    eight = isinstance(opt, optim.FlatAdamW8bit)
    if not eight:
        osd = get_optimizer_state_dict(unet, opt)
        tensors["optimizer"] = osd["state"]
    elif ckpt["per_rank"][procs.rank]["optimizer"]["sr"]:  # the stochastic-rounding generator's state, to be filled
        tensors["optimizer"][f"rank{procs.rank}"]["sr_gen"] = torch.Generator(device=procs.device).get_state()
    try:
        sharding.load_sharded(path, tensors)
    except (Exception, sharding.dcp.api.CheckpointException) as e:  # another model than the one saved
        raise UserError(f"cannot resume from {path}: its shards are damaged or are not this model's "
                        f"({type(e).__name__})") from None
    unet.load_state_dict(tensors["unet"])
    if eight:
        mine, plain = tensors["optimizer"][f"rank{procs.rank}"], ckpt["per_rank"][procs.rank]["optimizer"]
        buffers = [{key.split(".", 1)[1]: t for key, t in mine.items() if key.startswith(f"{i}.")}
                   for i in range(len(opt.buffers))]
        opt.load_state_dict({**plain, "sr_gen": mine.get("sr_gen"), "buffers": buffers})
    else:
        set_optimizer_state_dict(unet, opt, osd)
    if ema and ckpt["ema"]:
        for s, t in zip(ema.shadow, tensors["ema"].values()):
            s.copy_(sharding.local(t))
