"""
The training images: scanning a folder, aspect buckets, the crop/flip plan and SDXL's micro-conditioning,
decoding, and a deterministic, resumable, DDP-aware batch loader over the encoder cache (cache.py).

    buckets = data.make_buckets(area=1024 * 1024, step=64)
    items = data.scan_dataset("path/to/images", buckets, seed=1337, crop="center", flip=False)
    loader = data.Loader(items, cache, batch_size, rank=rank, world=world, seed=1337, caption_dropout=0.1)
    batch = loader.next_batch()   # {latents, context, pooled, time_ids, index, dropped}

Crop and flip are decided once per image at scan time, from (seed, relative path): the cache key contains
them, so a fixed choice makes the cache reusable across runs and epochs (kohya's sd-scripts does the same with
cached latents). The price is no fresh crop/flip per epoch; with flip=True a fixed random half is mirrored.
"""
import atexit
import hashlib
import io
import json
import math
import os
import queue
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from configurator import UserError, UserFileNotFound
from model import VAE_SCALE

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")

# -----------------------------------------------------------------------------
# aspect buckets

def make_buckets(area=1024 * 1024, step=64, max_aspect=2.5):
    """[(h, w)] sorted by aspect h/w: sides multiples of step, h*w <= area, both orientations, the square.
    max_aspect 2.5 reaches as far as SDXL's own training buckets did (640x1536; here 640x1600)."""
    assert step % 8 == 0, f"bucket step {step} must be a multiple of 8 (the VAE's downscale)"
    side = int(math.isqrt(area)) // step * step
    assert side >= step, f"area {area} is smaller than one {step}x{step} bucket"
    out = {(side, side)}
    for s in range(step, side + 1, step):
        long = area // s // step * step
        if long >= s and long / s <= max_aspect:
            out.add((s, long))
            out.add((long, s))
    return sorted(out, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(h, w, buckets):
    """The bucket whose log aspect ratio is nearest the image's (ties: the first in the list)."""
    a = math.log(h / w)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - a))


def plan_crop(orig_hw, bucket, crop="center", flip=False, rng=None):
    """-> (resize-to-cover size, crop (top, left), flipped?). The crop is measured in the flipped image, as SDXL's
    micro-conditioning wants: after a flip its left edge is resized_w - crop_w - left_before_flip."""
    (h, w), (bh, bw) = orig_hw, bucket
    scale = max(bh / h, bw / w)
    rh, rw = max(bh, round(h * scale)), max(bw, round(w * scale))
    if crop == "center":
        top, left = (rh - bh) // 2, (rw - bw) // 2
    elif crop == "random":
        top, left = rng.randint(0, rh - bh), rng.randint(0, rw - bw)
    else:
        raise ValueError(f"crop must be 'center' or 'random', not {crop!r}")
    flipped = bool(flip) and rng.random() < 0.5
    if flipped:
        left = rw - bw - left
    return (rh, rw), (top, left), flipped


# -----------------------------------------------------------------------------
# scanning a folder of images

@dataclass
class Item:
    index: int          # id of the image in this scan (its position); what batches report in `index`
    path: str           # absolute path
    rel: str            # path relative to the dataset root (the per-item seed and the messages use it)
    caption: str
    file_hash: str      # blake2b of the file's bytes: part of the cache key
    orig_hw: tuple      # (h, w) of the source after EXIF rotation, before resize
    bucket: tuple       # (h, w) target size
    resized_hw: tuple   # (h, w) after resize-to-cover
    crop_tl: tuple      # (top, left) of the crop in the resized image (in the flipped image when flip)
    flip: bool


def hash_bytes(data):
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _probe_image(path, verify, min_pixels):
    """-> ((file bytes hash, (h, w) after EXIF rotation), None), or (None, why the file is skipped)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            return None, "zero-size file"
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
            if verify:
                # JPEG: decode at 1/8 scale (DCT scaling) -- still reads every entropy-coded byte, so truncation
                # and corruption are caught at a fraction of the cost; other formats decode fully
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                im.load()
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return None, f"cannot read/decode ({type(e).__name__}: {e})"
    if orientation in (5, 6, 7, 8):  # EXIF rotations by 90 degrees swap the sides
        h, w = w, h
    if h * w < min_pixels:
        return None, f"too small ({h}x{w} < min_pixels {min_pixels})"
    return (hash_bytes(data), (h, w)), None


CAPTION_KEYS = ("text", "caption", "prompt")  # what metadata.jsonl files call the caption, in order of preference


def _read_metadata(root, log=print):
    """root/metadata.jsonl -> {normalised file_name: caption or None (= use the .txt)}, or None without the file.
    A line that is not a JSON object with a file_name is skipped with one printed line."""
    path = os.path.join(root, "metadata.jsonl")
    if not os.path.exists(path):
        return None
    if not os.path.isfile(path):
        raise UserError(f"{path} is not a file (a folder?): rename it, or make it a JSON-lines file")
    captions = {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                row = json.loads(raw.decode("utf-8")) if raw.strip() else {}
            except (UnicodeDecodeError, ValueError) as e:
                log(f"metadata.jsonl line {n}: skipped ({type(e).__name__}: not UTF-8 JSON)")
                continue
            if not row:
                continue
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                log(f"metadata.jsonl line {n}: skipped (not an object with a file_name string)")
                continue
            key = next((k for k in CAPTION_KEYS if k in row), None)
            caption = row.get(key)
            if isinstance(caption, list) and all(isinstance(c, str) for c in caption):
                caption = ", ".join(caption)  # a list of tags
            elif caption is not None and not isinstance(caption, (str, int, float)):
                log(f"metadata.jsonl line {n}: {key} is a {type(caption).__name__}, read as an empty caption")
                caption = ""
            elif key is None:
                log(f"metadata.jsonl line {n}: none of {', '.join(CAPTION_KEYS)}; the .txt caption is used, if any")
            elif caption is None:
                log(f"metadata.jsonl line {n}: {key} is null, read as an empty caption")
                caption = ""
            captions[os.path.normpath(row["file_name"])] = None if caption is None else str(caption)
    return captions


def _image_files(root):
    """Relative paths of the images under root, sorted; symlinked folders are followed, each real folder once."""
    rels, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree, or a second link to the same folder
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort()
        rels += [os.path.relpath(os.path.join(dirpath, fn), root) for fn in filenames
                 if fn.lower().endswith(IMAGE_EXTS)]
    return sorted(rels)


def scan_dataset(root, buckets=None, seed=0, crop="center", flip=False, min_pixels=None, verify=True, workers=8,
                 quiet=False):
    """Every image under root (sorted by relative path), checked, with its caption (metadata.jsonl, else the
    same-stem .txt, else empty) and its planned bucket, resize, crop and flip -> [Item]. Unreadable files and images
    under min_pixels (default: a quarter of the smallest bucket) are skipped with one printed line each; smaller
    ones are upscaled to cover their bucket, as kohya's sd-scripts does. buckets=None: make_buckets()'s, and no
    size is skipped (enough to read the captions). quiet=True prints nothing."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise UserFileNotFound(f"dataset folder {root} does not exist")
    if min_pixels is None:
        min_pixels = 0 if buckets is None else min(h * w for h, w in buckets) // 4
    buckets = make_buckets() if buckets is None else buckets
    log = (lambda *a: None) if quiet else print
    rels = _image_files(root)
    meta = _read_metadata(root, log)
    t0 = time.time()
    with ThreadPoolExecutor(max(1, workers)) as pool:  # Pillow releases the GIL while decoding
        probed = list(pool.map(lambda rel: _probe_image(os.path.join(root, rel), verify, min_pixels), rels))
    items, skipped, no_caption, upscaled = [], Counter(), [], 0
    for rel, (got, reason) in zip(rels, probed):
        if reason:
            log(f"skip {rel}: {reason}")
            skipped[reason.split(" (")[0]] += 1
            continue
        file_hash, orig_hw = got
        caption = meta.get(os.path.normpath(rel)) if meta is not None else None
        if caption is None:
            txt = os.path.join(root, os.path.splitext(rel)[0] + ".txt")
            if os.path.isdir(txt):
                log(f"{txt} is a folder, not a caption file: {rel} gets an empty caption")
            elif os.path.exists(txt):
                with open(txt, encoding="utf-8", errors="replace") as f:
                    caption = f.read().strip()
        if caption is None:
            no_caption.append(rel)
            caption = ""
        bucket = nearest_bucket(*orig_hw, buckets)
        # the item's rng from a hash, not Python's hash(): stable across processes, independent of the other files
        digest = hashlib.blake2b(f"{seed}\0{rel}".encode(), digest_size=8).digest()
        rng = random.Random(int.from_bytes(digest, "little"))
        resized, crop_tl, flipped = plan_crop(orig_hw, bucket, crop, flip, rng)
        items.append(Item(len(items), os.path.join(root, rel), rel, caption, file_hash, orig_hw, bucket,
                          resized, crop_tl, flipped))
        upscaled += resized[0] > orig_hw[0]
    if meta is not None:
        gone = sorted(set(meta) - {os.path.normpath(r) for r in rels})
        if gone:
            log(f"metadata.jsonl lists {len(gone)} files that are not images under {root}, e.g. {gone[0]}")
    if no_caption:
        log(f"{len(no_caption)} images have no caption (trained with an empty caption), e.g. {no_caption[0]}")
    detail = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items()))
    log(f"scan {root}: {len(rels)} image files, {len(items)} kept ({upscaled} upscaled to their bucket), "
        f"{len(rels) - len(items)} skipped{' (' + detail + ')' if detail else ''}, {time.time() - t0:.1f}s")
    return items


def split_eval(items, n, quiet=False):
    """(the first n items, held out for the eval; the rest, to train on). A training image whose bytes equal a
    held-out one's is left out, or the eval would measure memorisation."""
    held_out = {it.file_hash for it in items[:n]}
    train = [it for it in items[n:] if it.file_hash not in held_out]
    if len(train) < len(items) - n and not quiet:
        print(f"{len(items) - n - len(train)} training images are byte-identical to held-out ones: not trained on")
    if not train:
        raise UserError(f"no image is left to train on: the {len(items) - n} beyond the {n} held out (eval_items) are "
                        f"copies of held-out ones; add other images or lower --eval_items")
    return items[:n], train


# -----------------------------------------------------------------------------
# decoding and encoding

def load_image(item):
    """Decode item's file and apply its plan: resize to cover (Lanczos), crop, flip -> [3, h, w] in [-1, 1]."""
    with open(item.path, "rb") as f:
        data = f.read()
    if hash_bytes(data) != item.file_hash:
        raise UserError(f"{item.path} changed while this run was reading the dataset; run again to rescan it")
    (rh, rw), (top, left), (bh, bw) = item.resized_hw, item.crop_tl, item.bucket
    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: scale to 8 bits, convert() would clip
            arr = np.asarray(im).astype(np.float64)
            im = Image.fromarray(np.clip(arr / (257 if arr.max() > 255 else 1), 0, 255).astype(np.uint8), "L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")  # transparent pixels over white, not over whatever colour they happen to hold
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
        im = im.convert("RGB")
    im = im.resize((rw, rh), Image.LANCZOS)
    if item.flip:
        left = rw - bw - left  # crop_tl is measured in the flipped image; cut the same pixels, then mirror
        im = im.crop((left, top, left + bw, top + bh)).transpose(Image.FLIP_LEFT_RIGHT)
    else:
        im = im.crop((left, top, left + bw, top + bh))
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, h, w)
    return x.float() / 127.5 - 1.0


# -----------------------------------------------------------------------------
# the batch loader

def collate(items, source, dropped=None):
    """One batch from same-bucket items: latents [B,C,h,w] fp32 (mean * VAE_SCALE), context [B,77n,D], pooled [B,P]
    (both zero where dropped: the sampler's unconditional branch), time_ids [B,6] = (orig_h, orig_w, crop_top,
    crop_left, target_h, target_w), index [B] (item ids), dropped [B] bool."""
    dropped = torch.zeros(len(items), dtype=torch.bool) if dropped is None else dropped
    # load() returns new tensors (never the cached ones): editing them in place saves a copy of the batch's
    # biggest tensor (context: 77x2048 floats per image in SDXL, 231x2048 at max_token_length 225)
    mean, context, pooled = source.load(items)
    context[dropped] = 0.0
    pooled[dropped] = 0.0
    time_ids = torch.tensor([[*it.orig_hw, *it.crop_tl, *it.bucket] for it in items], dtype=torch.float32)
    return {"latents": mean.mul_(VAE_SCALE), "context": context, "pooled": pooled, "time_ids": time_ids,
            "index": torch.tensor([it.index for it in items], dtype=torch.long), "dropped": dropped}


def check_order(sd, seed, global_batch):
    """A saved loader state continues this run's order only with the same seed and global batch."""
    if sd["seed"] != seed or sd["global_batch"] != global_batch:
        raise UserError(f"the data order was saved with seed {sd['seed']} and global batch {sd['global_batch']} "
                        f"(batch_size x processes); this run has seed {seed} and global batch {global_batch}: "
                        f"resume with the same seed and batch_size x processes")


class Loader:
    """Single-bucket batches in an order that depends only on (seed, epoch, global batch), resumable exactly.

    Each epoch every bucket's items are shuffled and cut into global batches (batch_size * world), the last one
    filled up with the bucket's own items again (nothing is dropped), then the batches are shuffled. Rank r takes
    slots [r*B, (r+1)*B) of each: together the ranks give exactly the world=1 run with batch B*world. Caption
    dropout is drawn for the whole global batch from a generator in state_dict(): ranks agree, resume is exact.
    source: a cache.Cache, or anything whose .load(items) -> (mean, context, pooled) returns new tensors.
    Batches: see collate.
    """

    def __init__(self, items, source, batch_size, rank=0, world=1, seed=0, caption_dropout=0.1, verbose=True):
        assert items, "no images to train on"
        assert 0 <= rank < world, (rank, world)
        self.items, self.source, self.batch_size, self.rank, self.world = list(items), source, batch_size, rank, world
        self.global_batch = batch_size * world  # divisible by world by construction
        self.seed, self.caption_dropout = seed, caption_dropout
        self.by_bucket = {}
        for pos, it in enumerate(self.items):
            self.by_bucket.setdefault(tuple(it.bucket), []).append(pos)
        self.epoch, self.position = 0, 0
        self.gen = torch.Generator().manual_seed(seed)
        self._plan = (None, None)
        if rank == 0 and verbose:  # the bucket histogram
            counts = Counter(it.bucket for it in self.items)
            top, G = max(counts.values()), self.global_batch
            print(f"buckets: {len(self.items)} images in {len(counts)} buckets")
            for h, w in sorted(counts, key=lambda b: b[0] / b[1]):
                n = counts[h, w]
                note = f"  (< global batch {G}: repeats within the bucket)" if n < G else ""
                print(f"  {h:5d}x{w:<5d} aspect {w / h:4.2f} {n:7d} {'#' * max(1, round(40 * n / top))}{note}")
            print(f"loader: {len(self)} batches of {self.global_batch} (= {batch_size} per rank x {world}) per epoch")

    def plan(self, epoch):
        """The epoch's global batches, each a list of global_batch positions into items."""
        if self._plan[0] == epoch:
            return self._plan[1]
        rng = np.random.default_rng([self.seed, epoch])
        G, batches = self.global_batch, []
        for bucket in sorted(self.by_bucket):
            members = np.array(self.by_bucket[bucket])
            perm = members[rng.permutation(len(members))]
            n = -(-len(perm) // G)
            batches.extend(np.resize(perm, n * G).reshape(n, G).tolist())  # np.resize repeats cyclically
        batches = [batches[i] for i in rng.permutation(len(batches))]
        self._plan = (epoch, batches)
        return batches

    def __len__(self):
        return len(self.plan(self.epoch))

    def next_batch(self):
        batches = self.plan(self.epoch)
        if self.position >= len(batches):
            self.epoch, self.position = self.epoch + 1, 0
            batches = self.plan(self.epoch)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        drop = torch.rand(self.global_batch, generator=self.gen) < self.caption_dropout  # all of it: ranks agree
        items = [self.items[p] for p in batches[self.position][mine]]
        self.position += 1
        return collate(items, self.source, drop[mine])

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "dropout_rng": self.gen.get_state(),
                "seed": self.seed, "global_batch": self.global_batch, "n_items": len(self.items)}

    def load_state_dict(self, sd):
        check_order(sd, self.seed, self.global_batch)
        if sd["n_items"] != len(self.items):
            print(f"warning: dataset had {sd['n_items']} items when saved, now {len(self.items)}: order differs")
        self.epoch, self.position = int(sd["epoch"]), int(sd["position"])
        self.gen.set_state(sd["dropout_rng"])


def prefetch(loader, depth=2, pin_memory=False):
    """Yields (batch, loader state after it), built on a thread that overlaps the GPU step (the same batches: the
    loader touches only its own generators). The thread is stopped and joined when the generator is closed or at
    exit: one still inside a torch op at shutdown aborts the process ("terminate called without an active
    exception")."""
    q, stop = queue.Queue(depth), threading.Event()

    def put(item):  # into a full queue: wait, but notice a stop
        while not stop.is_set():
            try:
                return q.put(item, timeout=0.1)
            except queue.Full:
                pass

    def work():
        try:
            while not stop.is_set():
                batch = loader.next_batch()
                if pin_memory:
                    batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
                put((batch, loader.state_dict()))
        except Exception as e:  # handed to the training loop, which raises it
            put(e)

    def finish():
        stop.set()
        thread.join()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    atexit.register(finish)  # also when the caller never closes this generator (sys.exit mid-run)
    try:
        while True:
            got = q.get()
            if isinstance(got, Exception):
                raise got
            yield got
    finally:
        finish()
