"""
Sharding the UNet across processes, train.py --parallel=fsdp (docs/scaling.md): torch's FSDP2 (`fully_shard`, one
group per UNet block and one for the root) gives each card 1/N of the weights, grads and optimizer state.
Its resume state is a torch.distributed.checkpoint (DCP) folder: each rank writes and reads its own shards, and it
loads into another process count (resharded by DCP) when the optimizer state is sharded tensors (adamw).
"""
import errno
import os
import pickle
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

import files
from configurator import UserError


def blocks(unet):
    """The UNet's FSDP groups, in forward order: every input block, the middle block, every output block."""
    return [*unet.input_blocks, unet.middle_block, *unet.output_blocks]


def shard(unet, compute_dtype=None):
    """fully_shard each block, then the root (time_embed, label_emb, out). compute_dtype: the dtype the blocks
    are gathered in (bf16 halves the all-gathers); grads are reduced in fp32 and kept in the weights' dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in blocks(unet):
        fully_shard(block, mp_policy=mp)
    fully_shard(unet, mp_policy=mp)


def full(t):
    """The whole tensor of a shard (every rank must call, in the same order); a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t):
    """This rank's part of a tensor: the local shard of a DTensor, a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def like(param, t):
    """t (shaped like param's local shard) as a DTensor sharded like param; t as it is for a plain param."""
    if not isinstance(param, DTensor):
        return t
    return DTensor.from_local(t, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


# -----------------------------------------------------------------------------
# the sharded resume state: DCP shards of tensors + run.pt with the plain values (both read without pickle)

class SafeReader(dcp.FileSystemReader):
    """DCP's FileSystemReader, its .metadata pickle read by an unpickler that builds only DCP's metadata records,
    torch sizes and dtypes: a planted file cannot run code (as weights_only=True for ckpt.pt). DCP would unpickle
    other values freely, so only tensors are stored with it; plain values go to run.pt."""

    def read_metadata(self, *args, **kwargs):
        with open(os.path.join(self.path, ".metadata"), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        ok = module == "torch.distributed.checkpoint.metadata" or \
            (module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                               ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")} or \
            (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not ok:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return super().find_class(module, name)


class _Writer(dcp.FileSystemWriter):
    """DCP's FileSystemWriter, except that a write that fails for lack of space raises an OSError with that errno.
    DCP hands each rank's exception to every rank pickled, and a pickle drops the cause: torch.save's zip writer
    reports a short write as 'unexpected pos ...' with the OSError only as its cause."""

    def write_data(self, *args, **kwargs):
        return _errno_kept(super().write_data, *args, **kwargs)

    def finish(self, *args, **kwargs):  # (rank 0 writes .metadata here)
        return _errno_kept(super().finish, *args, **kwargs)


def _errno_kept(write, *args, **kwargs):
    try:
        return write(*args, **kwargs)
    except Exception as e:
        if files.no_room(e):  # a plain OSError pickles whole, errno included
            raise OSError(errno.ENOSPC, "No space left on device (or quota, or file-size limit)") from e
        raise


def _nbytes(tree):
    """Bytes of this rank's part of the tensors in a nested dict."""
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    return local(tree).numel() * tree.element_size() if isinstance(tree, torch.Tensor) else 0


def save_sharded(folder, tensors, plain, master):
    """Write `tensors` (a nested dict of tensors and DTensors; each rank's own entries under keys of its own)
    with DCP and `plain` (plain values, rank 0's) as run.pt, into a new folder that then replaces `folder`:
    a crash at any moment leaves the previous folder whole (or, between two renames, as folder.old)."""
    new, old = folder + ".new", folder + ".old"
    if master and os.path.exists(new):
        shutil.rmtree(new)
    dist.barrier()
    try:
        dcp.save(tensors, storage_writer=_Writer(new))
        if master:
            with files.atomic_path(os.path.join(new, "run.pt")) as tmp, open(tmp, "wb") as f:
                torch.save(plain, f)
        dist.barrier()
    except BaseException as e:  # (DCP's own CheckpointException is a BaseException)
        if master:
            shutil.rmtree(new, ignore_errors=True)
        failures = getattr(e, "failures", None) or {}  # a CheckpointException's: what each rank's failure came from
        if files.no_room(e) or any(files.no_room(f[0] if isinstance(f, tuple) else f) for f in failures.values()):
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(folder))).free / 2**30
            need = _nbytes(tensors) / 2**30
            raise UserError(f"no space left writing {folder}/: this process's shards need {need:.2f} GiB, {free:.2f} "
                            "GiB are free there; free some space and resume from the previous checkpoint, which is "
                            "untouched") from None
        raise
    if master:
        if os.path.exists(folder):
            os.replace(folder, old)
        os.replace(new, folder)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def recover(folder):
    """A crash between save_sharded's two renames leaves only folder.old: that is the last checkpoint."""
    if not os.path.exists(folder) and os.path.exists(folder + ".old"):
        os.replace(folder + ".old", folder)


def load_sharded(folder, tensors):
    """Fill `tensors` (the same nested structure, DTensors with this run's sharding) in place from `folder`,
    resharding what was saved by another process count; returns run.pt's plain values. Nothing is unpickled."""
    plain = torch.load(os.path.join(folder, "run.pt"), map_location="cpu", weights_only=True)
    reader = SafeReader(folder)
    # read .metadata once here: when DCP's loader cannot read it, it logs two tracebacks on stderr (falling back
    # to per-rank metadata) before it raises, and those would come before the one line the caller prints
    try:
        metadata = reader.read_metadata()
    except Exception as e:
        raise CheckpointDamaged(f"{folder}/.metadata cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, dcp.metadata.Metadata):
        raise CheckpointDamaged(f"{folder}/.metadata holds a {type(metadata).__name__}, not DCP's metadata")
    dcp.load(tensors, storage_reader=reader)
    return plain


class CheckpointDamaged(ValueError):
    """A sharded checkpoint's files cannot be read as one."""
