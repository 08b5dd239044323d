"""
The cache of the frozen encoders' outputs: every image's VAE mean and every caption's text embeddings are
computed once, before training, and read back from disk (and RAM) by the loader.

    cache = build_cache(items, sdxl, tok, "out/vpred/cache", device="cuda", rank=rank, world=world)
    mean, context, pooled = cache.load(items)       # what data.collate builds a batch from

cache_dir/latents/ab/<key>.safetensors holds an image's VAE mean (fp32 VAE, unscaled), keyed by (image bytes,
bucket, resize, crop, flip, VAE fingerprint); cache_dir/text/ab/<key>.safetensors a caption's (context, pooled),
keyed by (te1 ids, te2 ids, text-encoder fingerprint, max_token_length): token ids rather than text, so a
tokenizer change invalidates and equal captions share one file. Stale files are never read; corrupt ones
(unreadable, wrong shape, NaN/inf) are recomputed. A cached batch equals one encoded on the fly, bit for bit when
the encoders' output does not depend on the batch they run in. Under DDP each rank encodes its share.
"""
import contextlib
import hashlib
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import data
import files
from configurator import UserError
from tokenizer import CONTEXT_LENGTH, token_chunks, tokenize

# -----------------------------------------------------------------------------
# running the frozen encoders (always in fp32: the SDXL VAE overflows in fp16)

@contextlib.contextmanager
def _fp32(module):
    """Run a module in fp32 (the SDXL VAE overflows in fp16), restoring each tensor's dtype afterwards."""
    if not isinstance(module, torch.nn.Module):
        yield
        return
    named = lambda: list(module.named_parameters()) + list(module.named_buffers())
    dtypes = {name: t.dtype for name, t in named()}
    if all(d == torch.float32 or not d.is_floating_point for d in dtypes.values()):
        yield  # already fp32: the module is not touched
        return
    module.float()
    try:
        yield
    finally:
        for name, t in named():  # by name: .float() replaces buffer objects (parameters keep theirs)
            t.data = t.data.to(dtypes[name])


def encode_images(vae, items, device="cpu", pool=None):
    """VAE encoder mean, fp32, unscaled, on the CPU: [B, C, h/8, w/8] for same-bucket items."""
    images = list(pool.map(data.load_image, items)) if pool else [data.load_image(it) for it in items]
    x = torch.stack(images).to(device)
    with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False), _fp32(vae):
        mean, _ = vae.encode(x)
    return mean.float().cpu()


def encode_captions(encode_text, tokens1, tokens2, device="cpu"):
    """tokens [B, 77 n] (tokenizer.tokenize) -> (context [B, 77 n, D], pooled [B, P]), fp32, on the CPU. Each
    77-position chunk is encoded as a row of its own (all in one call), the contexts are concatenated in order,
    and pooled is the first chunk's, as A1111 and ComfyUI do (docs/sdxl_format.md §8)."""
    B, L = tokens1.shape
    n = L // CONTEXT_LENGTH
    assert L == n * CONTEXT_LENGTH and n >= 1 and tokens2.shape == tokens1.shape, (tokens1.shape, tokens2.shape)
    with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
        context, pooled = encode_text(tokens1.reshape(B * n, CONTEXT_LENGTH).to(device),
                                      tokens2.reshape(B * n, CONTEXT_LENGTH).to(device))
    # rows are caption-major (caption b's chunks are rows b n .. b n + n - 1), so a reshape puts them side by side
    context, pooled = context.reshape(B, n * CONTEXT_LENGTH, -1), pooled.reshape(B, n, -1)[:, 0]
    return context.float().cpu(), pooled.float().cpu()


def weights_fingerprint(*modules):
    """A hash of every tensor's name, shape and values (floats as fp32: fp16, bf16 and fp32 copies of the same
    weights hash alike). Part of cache keys, so it reads all of them: a sample misses a VAE changed elsewhere.
    Big tensors hash in a thread pool (hashlib releases the GIL): SDXL's encoders take 2-6 s on 2 cores."""
    tensors = [(f"{i}.{k}", t) for i, m in enumerate(modules) for k, t in sorted(m.state_dict().items())]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # (a hand-off costs more than a small tensor)
        big = [pool.submit(_tensor_digest, k, t) if t.numel() * t.element_size() >= 2 ** 20 else None
               for k, t in tensors]
        digests = [f.result() if f else _tensor_digest(k, t) for f, (k, t) in zip(big, tensors)]
    return hashlib.blake2b(b"".join(digests), digest_size=16).hexdigest()


def _tensor_digest(name, t):
    h = hashlib.blake2b(f"{name}:{tuple(t.shape)};".encode(), digest_size=16)
    if not t.is_meta:  # (a model built on the meta device has names and shapes only)
        t = t.detach()
        t = t.cpu().float() if t.is_floating_point() else t.cpu()
        t = t.contiguous().reshape(-1)
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        h.update(t.view(torch.uint8).numpy())  # the bytes, without another copy
    return h.digest()


# -----------------------------------------------------------------------------
# the cache: one safetensors file per entry, content-addressed

RAM_GB = 8.0  # cached entries kept in RAM too (an SDXL 1024^2 image's latent + caption: about 0.9 MB in fp32)
_ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}  # safetensors' names of the dtypes


def _latent_key(item, vae_fp, dtype=torch.float32):
    spec = f"latent v1|{item.file_hash}|{item.bucket}|{item.resized_hw}|{item.crop_tl}|{item.flip}|lanczos|{vae_fp}"
    return data.hash_bytes((spec + ("" if dtype == torch.float32 else f"|{dtype}")).encode())


def _text_key(t1, t2, text_fp, dtype=torch.float32, max_token_length=75):
    # the long-prompt layout is named too (its ids are longer anyway); 75 keeps the keys caches already have
    spec = b"text v1|" + t1.numpy().tobytes() + b"|" + t2.numpy().tobytes() + b"|" + text_fp.encode()
    layout = b"" if max_token_length == 75 else f"|chunks {token_chunks(max_token_length)}x77".encode()
    return data.hash_bytes(spec + layout + (b"" if dtype == torch.float32 else f"|{dtype}".encode()))


class Cache:
    """Cached VAE means ("mean" [C, h, w], unscaled) and text embeddings ("context" [77 n, D], "pooled" [P]) of a
    list of items, stored as `dtype` (bf16 or fp16 halve disk and RAM; load() casts back to fp32), the first
    RAM_GB of them kept in RAM too."""

    def __init__(self, cache_dir, lat_keys, txt_keys, dtype=torch.float32):
        self.dir, self.dtype = cache_dir, dtype
        self.lat_keys, self.txt_keys = lat_keys, txt_keys  # item.index -> key
        self.ram, self.ram_used, self.ram_bytes = {}, 0, int(RAM_GB * 2 ** 30)

    def path(self, kind, key):
        return os.path.join(self.dir, kind, key[:2], key + ".safetensors")

    def keep(self, kind, key, tensors):
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if (kind, key) not in self.ram and self.ram_used + size <= self.ram_bytes:
            self.ram[(kind, key)] = tensors
            self.ram_used += size

    def check(self, kind, key, shapes, full=True):
        """None if the file exists and holds finite tensors of the expected shapes and dtype; else why not."""
        path = self.path(kind, key)
        if not os.path.exists(path):
            return "missing"
        try:
            with safe_open(path, "pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return "wrong key"
                if not full:  # header only: names, shapes, dtypes
                    got = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
                    want = {k: (tuple(s), _ST[self.dtype]) for k, s in shapes.items()}
                    return None if got == want else f"expected {want}, found {got}"
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            return f"unreadable ({type(e).__name__}: {e})"
        got = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
        want = {k: (tuple(s), self.dtype) for k, s in shapes.items()}
        if got != want:
            return f"expected {want}, found {got}"
        if not all(torch.isfinite(v).all() for v in tensors.values()):
            return "non-finite values"
        self.keep(kind, key, tensors)  # the check read it anyway
        return None

    def write(self, kind, key, tensors):
        tensors = {k: v.to(self.dtype) for k, v in tensors.items()}
        with files.atomic_path(self.path(kind, key)) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"key": key})
        self.keep(kind, key, tensors)

    def read(self, kind, key):
        got = self.ram.get((kind, key))
        if got is None:
            got = load_file(self.path(kind, key))
            self.keep(kind, key, got)
        return got

    def load(self, items):
        """-> (mean [B, C, h, w] unscaled, context [B, 77 n, D], pooled [B, P]), fp32, new tensors (not the cache's)."""
        lat = [self.read("latents", self.lat_keys[it.index])["mean"] for it in items]
        txt = [self.read("text", self.txt_keys[it.index]) for it in items]
        return (torch.stack(lat).float(), torch.stack([t["context"] for t in txt]).float(),
                torch.stack([t["pooled"] for t in txt]).float())


def check_dir(cache_dir, items):
    """The cache folder, absolute; a UserError if it is one of the dataset's image folders (the cache never
    writes among a user's images)."""
    cache_dir = os.path.abspath(cache_dir)
    if cache_dir in {os.path.dirname(it.path) for it in items}:
        raise UserError(f"cache_dir {cache_dir} is an image folder of the dataset; keep the cache elsewhere")
    return cache_dir


def build_cache(items, encoders, tokenizer, cache_dir, device="cpu", batch_size=8, rank=0, world=1, vae_fp=None,
                text_fp=None, verify=True, workers=8, group=None, dtype=torch.float32, max_token_length=75):
    """Make sure every item's VAE mean and text embedding is cached; return the Cache.

    encoders: the SDXL model (or a stand-in) with .vae.encode(img [B,3,H,W] in [-1,1]) -> (mean, logvar) and
    .encode_text(tokens1, tokens2) -> (context [B,77,D], pooled [B,P]) on 77-token rows. verify=False checks
    only the files' headers. group: the process group the ranks wait in (with a long timeout: a rank may encode
    for hours). max_token_length: 75 | 150 | 225 caption tokens, cached as 1 | 2 | 3 chunks of 77 positions.
    """
    cache_dir = check_dir(cache_dir, items)
    distributed = world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed:  # no process group: nobody else would do the other shares
        rank, world = 0, 1
    vae, encode_text = encoders.vae, encoders.encode_text
    vae_fp = weights_fingerprint(vae) if vae_fp is None else vae_fp
    if text_fp is None:
        if not (hasattr(encoders, "te1") and hasattr(encoders, "te2")):
            raise ValueError("encoders has no te1/te2 to fingerprint: pass text_fp (weights_fingerprint of the "
                             "text encoders)")
        text_fp = weights_fingerprint(encoders.te1, encoders.te2)  # not the whole model: the UNet trains

    # 1. keys: one latent entry per (image, plan), one text entry per distinct token pair
    tokens1, tokens2 = tokenize(tokenizer, [it.caption for it in items], max_token_length=max_token_length)
    cache = Cache(cache_dir, {it.index: _latent_key(it, vae_fp, dtype) for it in items},
                  {it.index: _text_key(tokens1[i], tokens2[i], text_fp, dtype, max_token_length)
                   for i, it in enumerate(items)}, dtype)
    images, captions = {}, {}  # key -> what to encode
    for i, it in enumerate(items):
        images.setdefault(cache.lat_keys[it.index], it)
        captions.setdefault(cache.txt_keys[it.index], (tokens1[i], tokens2[i]))

    # 2. what is missing or corrupt, against the shapes one tiny probe of each encoder gives
    channels, factor, text_shapes = _output_shapes(vae, encode_text, tokenizer, device, max_token_length)
    lat_shapes = {k: {"mean": (channels, it.bucket[0] // factor, it.bucket[1] // factor)} for k, it in images.items()}
    lat_todo = _todo(cache, "latents", lat_shapes, verify)
    txt_todo = _todo(cache, "text", dict.fromkeys(captions, text_shapes), verify)

    # 3. encode, in batches that never mix two buckets; rank r takes batches r, r + world, ...
    bucket = lambda k: images[k].bucket
    lat_batches = _batches(sorted(lat_todo, key=lambda k: (bucket(k), images[k].index)), batch_size, bucket)
    txt_batches = _batches(txt_todo, 4 * batch_size)
    if distributed:  # every rank must have listed its to-dos before anyone writes, or the shares differ
        torch.distributed.barrier(group=group)
    with ThreadPoolExecutor(max(1, workers)) as pool:  # decodes a batch's images in parallel
        def encode_lat(keys):
            mean = encode_images(vae, [images[k] for k in keys], device, pool)
            return [{"mean": m.clone()} for m in mean]  # clone: one small storage per entry, not views of the batch

        def encode_txt(keys):
            context, pooled = encode_captions(encode_text, torch.stack([captions[k][0] for k in keys]),
                                              torch.stack([captions[k][1] for k in keys]), device)
            return [{"context": c.clone(), "pooled": p.clone()} for c, p in zip(context, pooled)]

        _encode(cache, "latents", lat_batches[rank::world], encode_lat)
        _encode(cache, "text", txt_batches[rank::world], encode_txt)
        if distributed:  # 4. a rank that failed left holes: fill them here
            torch.distributed.barrier(group=group)
            others = lambda batches: [k for i, b in enumerate(batches) if i % world != rank for k in b]
            redo = [k for k in others(lat_batches) if cache.check("latents", k, lat_shapes[k], full=verify)]
            _encode(cache, "latents", _batches(redo, batch_size, bucket), encode_lat)
            redo = [k for k in others(txt_batches) if cache.check("text", k, text_shapes, full=verify)]
            _encode(cache, "text", _batches(redo, 4 * batch_size), encode_txt)
    return cache


def _output_shapes(vae, encode_text, tokenizer, device, max_token_length):
    """(latent channels, VAE downsampling factor, text entry shapes), from one 64x64 image and one caption."""
    with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False), _fp32(vae):
        z = vae.encode(torch.zeros(1, 3, 64, 64, device=device))[0]
    context, pooled = encode_captions(encode_text, *tokenize(tokenizer, [""], max_token_length=max_token_length),
                                      device=device)
    return z.shape[1], 64 // z.shape[-1], {"context": tuple(context.shape[1:]), "pooled": tuple(pooled.shape[1:])}


def _todo(cache, kind, shapes, verify):
    """Keys (of shapes, key -> expected entry shapes) whose file is missing or corrupt; prints the tally."""
    todo, bad = [], 0
    for key, shape in shapes.items():
        why = cache.check(kind, key, shape, full=verify)
        if why is not None:
            if why != "missing":
                bad += 1
                print(f"cache: {cache.path(kind, key)} is corrupt ({why}); recomputing")
            todo.append(key)
    print(f"cache {kind}: {len(shapes)} entries, {len(shapes) - len(todo)} cached, {len(todo) - bad} missing, "
          f"{bad} corrupt")
    return todo


def _encode(cache, kind, batches, encode_batch):
    """encode_batch(keys) -> one dict of tensors per key, written to the cache; progress every 10 s."""
    total, done, t0, last = sum(map(len, batches)), 0, time.time(), 0.0
    for keys in batches:
        for key, tensors in zip(keys, encode_batch(keys)):
            cache.write(kind, key, tensors)
        done += len(keys)
        now = time.time()
        if done == total or now - last > 10:
            last = now
            rate = done / max(now - t0, 1e-9)
            print(f"cache {kind}: {done}/{total} ({100 * done / total:.0f}%) {rate:.1f}/s "
                  f"eta {(total - done) / max(rate, 1e-9):.0f}s")


def _batches(keys, size, bucket_of=lambda key: None):
    """keys (sorted by bucket) cut into batches of <= size that never span two buckets."""
    batches = []
    for _, run in itertools.groupby(keys, bucket_of):
        run = list(run)
        batches += [run[i:i + size] for i in range(0, len(run), size)]
    return batches
