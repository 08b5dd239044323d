"""
The SDXL single-file checkpoint (sgm layout, `sd_xl_base_1.0.safetensors`): load it with every size inferred
from tensor shapes, save it back with the v_pred / ztsnr markers and modelspec metadata (docs/sdxl_format.md).
model.SDXL's state_dict() keys are the file's keys, so loading is a shape check and a copy, not a converter.
Bad files raise CheckpointError with one line that says what the file is and which keys are wrong.
"""
import json
import math
import os
import struct
import time
from collections import namedtuple

import torch
from torch.distributed.tensor import DTensor

import files
from configurator import UserError
from model import PREFIX, SDXL, TIME_ID_DIM, SDXLConfig, TextConfig, UNetConfig, VAEConfig


class CheckpointError(UserError):
    """The file is not an SDXL base checkpoint in the sgm layout; the message says what is wrong / what it is."""


class MissingCheckpoint(CheckpointError, FileNotFoundError):
    """There is no file at the path given."""


IGNORED_KEYS = {"v_pred", "ztsnr", PREFIX["te1"] + "embeddings.position_ids"}  # markers, constant int64 ids
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
ST_DTYPES = {name: dtype for dtype, name in _ST_DTYPES.items()}  # the header's dtype names -> torch's
FLOAT_NAMES = ("F32", "F16", "BF16", "F64")


def _count(shapes, prefix):
    """Number of numbered children under prefix: _count(shapes, '...encoder.layers.') == 12 for CLIP-L."""
    ids = {k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)}
    return max((int(i) + 1 for i in ids if i.isdigit()), default=0)


def _few(keys, n=4):
    keys = sorted(keys)
    return f"{len(keys)} ({', '.join(keys[:n])}{', ...' if len(keys) > n else ''})"


def _looks_like(keys):
    has = lambda prefix: any(k.startswith(prefix) for k in keys)
    if has("cond_stage_model."):
        return "an SD1.x/SD2.x checkpoint (text encoder under cond_stage_model.)"
    if has("conditioner.embedders.0.model.") or (has("conditioner.") and not has(PREFIX["te1"])):
        return "an SDXL refiner checkpoint (embedder 0 is OpenCLIP bigG, no CLIP-L)"
    if has(PREFIX["unet"]) and not has("first_stage_model.") and not has("conditioner."):
        return "a UNet-only sgm file (no VAE, no text encoders)"
    if has("down_blocks.") or has("unet.") or has("lora_"):
        return "a diffusers-format model or a LoRA, not a single-file sgm checkpoint"
    return "something else"


def config_from_shapes(shapes: dict) -> SDXLConfig:
    """Infer every SDXLConfig field from {key: shape} of an sgm file. Not in the file, so fixed: attention heads
    are 64 wide (SDXL everywhere), GroupNorm has 32 groups, each time id is embedded with 256 channels."""
    s = lambda part, key: shapes[PREFIX[part] + key]
    # UNet: levels = downsamples + 1; ResBlocks per level from the position of the first downsample
    u = PREFIX["unet"]
    mc, cin = s("unet", "input_blocks.0.0.weight")[:2]
    n_in = _count(shapes, u + "input_blocks.")
    downs = [i for i in range(n_in) if f"{u}input_blocks.{i}.0.op.weight" in shapes]
    nrb = downs[0] - 1 if downs else n_in - 1
    firsts = [1 + level * (nrb + 1) for level in range(len(downs) + 1)]  # first input block of each level
    unet = UNetConfig(
        in_channels=cin, out_channels=s("unet", "out.2.weight")[0], model_channels=mc, num_res_blocks=nrb,
        channel_mult=tuple(s("unet", f"input_blocks.{i}.0.out_layers.3.weight")[0] // mc for i in firsts),
        transformer_depth=tuple(_count(shapes, f"{u}input_blocks.{i}.1.transformer_blocks.") for i in firsts),
        transformer_depth_middle=_count(shapes, u + "middle_block.1.transformer_blocks."),
        context_dim=s("unet", "middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        adm_in_channels=s("unet", "label_emb.0.0.weight")[1])
    v = PREFIX["vae"]
    vae_ch, vae_in = s("vae", "encoder.conv_in.weight")[:2]
    vae = VAEConfig(in_channels=vae_in, ch=vae_ch, z_channels=s("vae", "decoder.conv_in.weight")[1],
                    ch_mult=tuple(s("vae", f"encoder.down.{i}.block.0.conv1.weight")[0] // vae_ch
                                  for i in range(_count(shapes, v + "encoder.down."))),
                    num_res_blocks=_count(shapes, v + "encoder.down.0.block."))
    vocab1, w1 = s("te1", "embeddings.token_embedding.weight")
    te1 = TextConfig(vocab_size=vocab1, width=w1, n_ctx=s("te1", "embeddings.position_embedding.weight")[0],
                     layers=_count(shapes, PREFIX["te1"] + "encoder.layers."),
                     mlp_dim=s("te1", "encoder.layers.0.mlp.fc1.weight")[0], act="quick_gelu")
    vocab2, w2 = s("te2", "token_embedding.weight")
    te2 = TextConfig(vocab_size=vocab2, width=w2, n_ctx=s("te2", "positional_embedding")[0],
                     layers=_count(shapes, PREFIX["te2"] + "transformer.resblocks."),
                     mlp_dim=s("te2", "transformer.resblocks.0.mlp.c_fc.weight")[0], act="gelu",
                     proj_dim=s("te2", "text_projection")[1])
    if unet.context_dim != w1 + w2 or unet.adm_in_channels != te2.proj_dim + 6 * TIME_ID_DIM:
        raise CheckpointError(f"UNet context width {unet.context_dim} / y width {unet.adm_in_channels} do not match "
                              f"the text encoders ({w1} + {w2}; {te2.proj_dim} + 6*{TIME_ID_DIM})")
    # A file without CLIP-L's last layer (unused by SDXL) would be read as an 11-layer encoder whose penultimate
    # state is one layer too early -- silently wrong conditioning. So we refuse it rather than accept it.
    if w1 == 768 and te1.layers != 12:
        raise CheckpointError(f"CLIP-L (width 768) has {te1.layers} layers in this file, expected 12 (a pruned "
                              f"last layer would shift the penultimate hidden state; restore the full encoder)")
    return SDXLConfig(unet=unet, vae=vae, te1=te1, te2=te2)


def fetch(spec):
    """hf:OWNER/NAME/FILE -> a local path through huggingface_hub's cache (lazy import); else the path itself."""
    if not spec.startswith("hf:"):
        return spec
    parts = spec[3:].split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise UserError(f"{spec!r}: a hub checkpoint is named hf:OWNER/NAME/FILE, e.g. "
                        "hf:stabilityai/stable-diffusion-xl-base-1.0/sd_xl_base_1.0.safetensors")
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(f"{parts[0]}/{parts[1]}", parts[2])
    except Exception as e:  # offline, no such repo or file, no access: all fixed by the user, not by a traceback
        raise UserError(f"cannot fetch {spec} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        "check the name and the network, or download the file and pass its path") from None


def open_file(path):
    """safe_open(path) with the file's failure modes as one CheckpointError each."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise MissingCheckpoint(f"checkpoint not found (or not a file): {path}")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError for a bad header, OSError for an unreadable file
        with open(path, "rb") as fh:
            head = fh.read(2)
        pickle = head[:1] == b"\x80" or head == b"PK"  # torch.save: zip archive (new) or bare pickle (old)
        hint = " It looks like a PyTorch pickle (.ckpt/.pt); convert it to .safetensors." if pickle else ""
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated, or another format): "
                              f"{e}.{hint}") from None


def _config(path, shapes):
    missing_parts = [p for p in PREFIX.values() if not any(k.startswith(p) for k in shapes)]
    if missing_parts:
        raise CheckpointError(f"{path}: not an SDXL base checkpoint in the sgm layout; it looks like "
                              f"{_looks_like(shapes)}. No keys under {', '.join(missing_parts)}")
    try:
        return config_from_shapes(shapes)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e.args[0]} (needed to infer the model sizes)") from None


def read_config(path) -> SDXLConfig:
    """The model sizes of a checkpoint from its header alone (nothing is loaded): for checks before loading.
    Weights stored as integers (a quantised file) are refused here, before hours of caching."""
    with open_file(path) as f:
        ints = [k for k in f.keys() if k not in IGNORED_KEYS and f.get_slice(k).get_dtype() not in FLOAT_NAMES]
        if ints:
            raise CheckpointError(f"{path}: {len(ints)} weights are not floating point, e.g. {_few(ints, 2)} "
                                  f"({f.get_slice(ints[0]).get_dtype()}): a quantised file; use an fp32/fp16/bf16 one")
        return _config(path, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})


def meta_model(path, shapes) -> SDXL:
    """The SDXL (on the meta device) that the file's shapes describe, once its keys are checked against it."""
    cfg = _config(path, shapes)
    with torch.device("meta"):
        sdxl = SDXL(cfg)
    expected = {k: tuple(t.shape) for k, t in sdxl.state_dict().items()}
    missing = expected.keys() - shapes.keys()
    unexpected = shapes.keys() - expected.keys() - IGNORED_KEYS
    misshaped = [f"{k} {shapes[k]} vs {expected[k]}" for k in expected.keys() & shapes.keys()
                 if shapes[k] != expected[k]]
    if missing or unexpected or misshaped:
        raise CheckpointError(f"{path}: keys do not match the SDXL layout inferred from the file's shapes: "
                              f"missing {_few(missing)}; unexpected {_few(unexpected)}; "
                              f"mis-shaped (file vs model) {_few(misshaped, 3)}")
    return sdxl


def load_checkpoint(path, device="cpu", dtype=torch.float32) -> SDXL:
    """Load an SDXL base single-file sgm checkpoint (.safetensors). Sizes come from the tensor shapes; the model is
    built on the meta device and each tensor is read (memory-mapped) and cast on its own, so RAM never holds a
    second copy. Raises CheckpointError (a ValueError) naming what is missing / unexpected / mis-shaped."""
    with open_file(path) as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        sdxl = meta_model(path, shapes)
        state = {}
        for k in sdxl.state_dict():
            t = f.get_tensor(k)
            state[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        metadata = f.metadata() or {}
    sdxl.load_state_dict(state, strict=True, assign=True)
    sdxl.v_pred, sdxl.ztsnr, sdxl.metadata = "v_pred" in shapes, "ztsnr" in shapes, metadata
    return sdxl


# A tensor made only when it is written: its shape and dtype for the header, and fn() -> the tensor. So a tool can
# write a whole SDXL file computed tensor by tensor (transfer.py) through the one writer below.
Lazy = namedtuple("Lazy", "shape dtype fn")


def write_safetensors(tensors, path, metadata, dtype=None, write=True):
    """The safetensors format by hand (8-byte header length, JSON header, raw little-endian data), atomically.
    Keys and metadata sorted, so the same weights give the same bytes (safetensors' writer orders metadata by a
    randomly seeded hash map); one tensor at a time is cast and copied, so SDXL is never held twice in RAM.
    dtype: for floating-point tensors (None = keep). FSDP's DTensors are gathered one at a time, which every rank
    must join: the ranks that do not write pass write=False."""
    names = sorted(tensors)
    out_dtype = {k: dtype if dtype is not None and tensors[k].dtype.is_floating_point else tensors[k].dtype
                 for k in names}
    header, offset = {"__metadata__": dict(sorted(metadata.items()))}, 0
    for k in names:
        n = math.prod(tensors[k].shape) * torch.empty((), dtype=out_dtype[k]).element_size()
        header[k] = {"dtype": _ST_DTYPES[out_dtype[k]], "shape": list(tensors[k].shape),
                     "data_offsets": [offset, offset + n]}
        offset += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the data starts 8-byte aligned

    def whole(t):
        if isinstance(t, Lazy):
            return t.fn()
        return t.detach().full_tensor() if isinstance(t, DTensor) else t.detach()

    if not write:
        for k in names:
            whole(tensors[k])
        return
    with files.atomic_path(path, size=8 + len(h) + offset) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for k in names:
            t = whole(tensors[k]).to(out_dtype[k]).contiguous().cpu()
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def save_checkpoint(sdxl, path, v_pred=True, ztsnr=True, metadata=None, dtype=None, write=True):
    """Write the sgm layout (2515 keys for SDXL base) + the empty `v_pred` / `ztsnr` markers (ComfyUI, Forge,
    A1111 read them) + modelspec metadata, atomically. dtype: for float tensors, None = keep. metadata: extra
    entries, non-str values JSON-encoded. A torch.compile wrapper (or compiled submodule) is unwrapped."""
    sdxl = getattr(sdxl, "_orig_mod", sdxl)
    tensors = {k.replace("_orig_mod.", ""): t for k, t in sdxl.state_dict().items()}
    save_state(tensors, sdxl.cfg, path, v_pred, ztsnr, metadata, dtype, write)


def save_state(tensors, cfg, path, v_pred=True, ztsnr=True, metadata=None, dtype=None, write=True):
    """save_checkpoint for a {sgm key: tensor or Lazy} dict of the model `cfg` describes instead of a module."""
    tensors = dict(tensors)
    tensors[PREFIX["te1"] + "embeddings.position_ids"] = torch.arange(cfg.te1.n_ctx, dtype=torch.int64)[None]
    markers = (("v_pred", v_pred), ("ztsnr", ztsnr))
    tensors.update({marker: torch.zeros(0) for marker, on in markers if on})  # cast like the rest; empty either way
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base",
            "modelspec.implementation": "sgm", "modelspec.prediction_type": "v" if v_pred else "epsilon",
            "modelspec.title": os.path.splitext(os.path.basename(path))[0],
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    write_safetensors(tensors, path, meta, dtype, write)
