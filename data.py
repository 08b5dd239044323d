"""
Data for the SDXL v-prediction uptrain: tokenizer, image folders, aspect buckets, latent/text caches, and a
deterministic, resumable, DDP-aware batch loader. Runtime deps: torch, numpy, safetensors, pillow, regex
(huggingface_hub only for `hf:` tokenizer specs, imported lazily).

Usage (what train.py does):
    tok = data.load_tokenizer("hf:stabilityai/stable-diffusion-xl-base-1.0")   # or a folder with vocab.json + merges.txt
    buckets = data.make_buckets(area=1024 * 1024, step=64)
    items = data.scan_dataset("path/to/images", buckets, seed=1337, crop="center", flip=False)
    cache = data.build_cache(items, sdxl, tok, "cache/", device="cuda", rank=rank, world=world)
    loader = data.Loader(items, cache, batch_size, rank=rank, world=world, seed=1337, caption_dropout=0.1)
    batch = loader.next_batch()   # {latents, context, pooled, time_ids, index, dropped}
    ckpt["data"] = loader.state_dict();  ...;  loader.load_state_dict(ckpt["data"])

Public API
    CLIPTokenizer(vocab_path, merges_path)          CLIP BPE; tok(texts, pad_id=None) -> LongTensor [B,77]
                                                    (pad_id None = EOS = 49407 in SDXL; te2 wants pad_id=0)
    clean_text(text) -> str                         the text cleaning the tokenizer applies (see below)
    vocab_from_openclip(bpe_gz_path=None, out_dir)  open_clip's bpe_simple_vocab_16e6.txt.gz -> vocab.json + merges.txt
    build_tiny_vocab(out_dir, texts, n_merges=256)  learn a small BPE vocabulary from texts (offline tiny demo)
    load_tokenizer(spec)                            spec: folder (vocab.json + merges.txt, or tokenizer/ inside),
                                                    open_clip .txt.gz file, or "hf:REPO" (snapshot of tokenizer/)
    make_synthetic_dataset(root, n, seed, sizes)    PNG + .txt shapes dataset; deterministic; idempotent
    make_buckets(area, step, max_aspect) -> [(h,w)] aspect buckets, sides multiples of step, h*w <= area
    nearest_bucket(h, w, buckets) -> (h, w)         bucket of nearest log aspect ratio
    scan_dataset(root, buckets, seed, crop, flip, min_pixels, verify, workers, quiet) -> [Item]
                                                    find, check and plan (bucket, resize, crop, flip) every image
    print_bucket_histogram(items, global_batch)     one line per used bucket, flags buckets that repeat
    load_image(item) -> Tensor [3,h,w] in [-1,1]    decode + resize to cover + crop (+ flip), as planned at scan
    plan_crop(orig_hw, bucket, crop, flip, rng)     -> (resized_hw, (top, left), flipped), the micro-conditioning maths
    weights_fingerprint(*modules) -> str            cheap hash of names, shapes and a sample of weight values
    tokenize(tok, captions) -> (tokens1, tokens2)   te1 ids (EOS padding), te2 ids (0 padding)
    encode_images(vae, items) / encode_captions(encode_text, tokens1, tokens2)   the encoders, fp32, on the CPU
    build_cache(items, encoders, tokenizer, cache_dir, device, batch_size, rank, world, ...) -> Cache
                                                    encoders = sdxl (.vae.encode, .encode_text, .te1, .te2); encodes
                                                    what is missing/stale/corrupt, one safetensors file per entry
    Cache.load(items) -> (mean, context, pooled)    cached VAE means (unscaled) and text embeddings, RAM-backed
    OnTheFly(encoders, tokenizer, device)           same .load(items) interface, encoding every time (no cache)
    Loader(items, source, batch_size, rank, world, seed, caption_dropout, vae_scale, verbose)
                                                    (rank 0 prints the bucket histogram unless verbose=False)
        .next_batch() -> dict, iter(loader), len(loader) (batches per epoch), .state_dict(), .load_state_dict()

Text cleaning: transformers-5 CLIPTokenizer style (NFC, whitespace runs -> one space, lower-case), not
open_clip's ftfy + html.unescape. So ids equal transformers' on every prompt we test; they differ from
open_clip's on ligatures, fullwidth forms, curly quotes and HTML entities, which ftfy rewrites.

Caches live under cache_dir (asserted not to be an image folder): latents/ab/<key>.safetensors holds the VAE
encoder mean (fp32 VAE, unscaled; x VAE_SCALE when a batch is built), keyed by (image bytes, bucket, resize,
crop, flip, VAE fingerprint); text/ab/<key>.safetensors holds (context, pooled), keyed by (te1 ids, te2 ids,
text-encoder fingerprint) -- token ids rather than caption text, so a tokenizer change invalidates and equal
captions share one file. A changed input is a new key (stale files are never read); corrupt files (unreadable,
wrong shape, NaN/inf) are found at build time and recomputed. A cached loader gives the same batches as
OnTheFly, bit for bit when the encoders' output does not depend on the batch they run in.

Crop and flip are decided once per image at scan time, from (seed, relative path): the cache key contains
them, so a fixed choice makes the cache reusable across runs and epochs (this is what kohya's sd-scripts
does with cached latents too). The price is no fresh crop/flip per epoch; with flip=True a fixed random
half of the images is mirrored.
"""
import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import random
import tempfile
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import regex
import torch
from PIL import Image, ImageDraw, ImageOps
from safetensors import safe_open
from safetensors.torch import load_file, save_file

VAE_SCALE = 0.13025  # = model.VAE_SCALE (sdxl_format.md); repeated here so data.py does not import the model
CONTEXT_LENGTH = 77  # BOS + 75 tokens + EOS
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")

# -----------------------------------------------------------------------------
# tokenizer (CLIP BPE, Radford et al. 2021; one vocabulary for both SDXL text encoders)

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-split: specials, contractions, letter runs, single digits, runs of everything else. Written with
# \p{White_Space} where CLIP writes \s: Python's \s also matches the ASCII separators \x1c-\x1f, which
# Oniguruma (transformers' tokenizers) and Unicode do not count as whitespace.
SPLIT_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\p{White_Space}\p{L}\p{N}]+""")
_WHITESPACE = regex.compile(r"\p{White_Space}+")
# The specials are matched in the raw text, case-sensitively, before any cleaning (as transformers does with
# its added tokens). "<|ENDOFTEXT|>" is text: lower-cased, pre-split as one piece, which transformers' byte-level
# step splits again (GPT-2 pattern) into "<|", "endoftext", "|>" -- the only pieces that step changes.
_SPECIALS = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_SPECIAL_AS_TEXT = {BOS_TOKEN: ["<|", "startoftext", "|>"], EOS_TOKEN: ["<|", "endoftext", "|>"]}


@lru_cache()
def bytes_to_unicode():
    """utf-8 byte -> printable unicode char (GPT-2/CLIP): printable bytes map to themselves, the rest to 256+n."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clean_text(text):
    """transformers-5 CLIPTokenizer normaliser: NFC, whitespace runs -> one space, lower-case."""
    text = unicodedata.normalize("NFC", text)
    text = _WHITESPACE.sub(" ", text)  # cosmetic: the pre-split drops whitespace anyway (no str.strip(): its
    # whitespace includes \x1c-\x1f, see SPLIT_PATTERN)
    # Python's lower() turns a word-final capital sigma into final-form "ς"; the tokenizers library lowers
    # char by char (always "σ"). Lower it ourselves first so the ids match.
    return text.replace("Σ", "σ").lower()


def _byte_encode(piece):
    enc = bytes_to_unicode()
    return "".join(enc[b] for b in piece.encode("utf-8"))


def _read_merges(path):
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [tuple(line.split()) for line in lines if line.strip()]


class CLIPTokenizer:
    """CLIP BPE tokenizer from a vocab.json + merges.txt pair (the SDXL repo's tokenizer/ folder).

    tok(texts, pad_id=None) -> LongTensor [B, 77]: BOS, tokens, EOS, then pad_id (default EOS). Longer texts
    are truncated to 75 tokens so position 76 holds EOS. BOS/EOS ids are read from the vocabulary, so small
    vocabularies (build_tiny_vocab) work the same way.
    """

    def __init__(self, vocab_path, merges_path):
        with open(vocab_path, encoding="utf-8") as f:
            self.vocab = json.load(f)
        merges = _read_merges(merges_path)
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.bos, self.eos = self.vocab[BOS_TOKEN], self.vocab[EOS_TOKEN]
        self.vocab_size = len(self.vocab)
        self.cache = {}  # piece (after cleaning and pre-split) -> ids

    def bpe(self, word):
        """Byte-level word (str) -> list of BPE symbols, the last one ending in '</w>' (CLIP's algorithm)."""
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = self.ranks
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence, left to right
                if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode(self, text):
        """text -> token ids, without BOS/EOS and without truncation."""
        ids = []
        for k, part in enumerate(_SPECIALS.split(text)):
            if k % 2:  # a special token, written literally in the prompt
                ids.append(self.vocab[part])
                continue
            for piece in SPLIT_PATTERN.findall(clean_text(part)):
                got = self.cache.get(piece)
                if got is None:
                    # an unknown symbol only comes from a malformed vocabulary: EOS, like transformers' unk
                    got = [self.vocab.get(s, self.eos) for word in _SPECIAL_AS_TEXT.get(piece, [piece])
                           for s in self.bpe(_byte_encode(word))]
                    if len(self.cache) < 500_000:  # bound the memory a stream of unique junk words can take
                        self.cache[piece] = got
                ids.extend(got)
        return ids

    def __call__(self, texts, pad_id=None, length=CONTEXT_LENGTH):
        if isinstance(texts, str):
            texts = [texts]
        pad = self.eos if pad_id is None else pad_id
        rows = []
        for text in texts:
            ids = [self.bos] + self.encode(text)[: length - 2] + [self.eos]
            rows.append(ids + [pad] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)


def _write_vocab(out_dir, vocab_list, merges):
    os.makedirs(out_dir, exist_ok=True)
    vocab = {}
    for tok in vocab_list:
        vocab.setdefault(tok, len(vocab))  # a duplicate (two merges giving one string) keeps its first id
    _atomic_write_text(os.path.join(out_dir, "vocab.json"), json.dumps(vocab, ensure_ascii=False))
    _atomic_write_text(os.path.join(out_dir, "merges.txt"),
                       "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return out_dir


def _base_vocab():
    chars = list(bytes_to_unicode().values())
    return chars + [c + "</w>" for c in chars]


def openclip_bpe_path():
    """Where the open_clip_torch wheel keeps its vocabulary, found without importing open_clip."""
    import importlib.util
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed: `pip install --no-deps open_clip_torch` "
                                "puts bpe_simple_vocab_16e6.txt.gz on disk, or pass the file's path")
    return os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")


def vocab_from_openclip(bpe_gz_path=None, out_dir="tokenizer"):
    """Write vocab.json + merges.txt with the same content as SDXL's tokenizer/ files, from open_clip's .gz."""
    bpe_gz_path = bpe_gz_path or openclip_bpe_path()
    with gzip.open(bpe_gz_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    # line 0 is a header; CLIP uses the first 49152 - 256 - 2 = 48894 merges (49408 = 512 + 48894 + 2)
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    vocab = _base_vocab() + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    assert len(vocab) == 49408, len(vocab)
    return _write_vocab(out_dir, vocab, merges)


def build_tiny_vocab(out_dir, texts, n_merges=256):
    """Learn a small CLIP-style BPE vocabulary from texts: 256 bytes + their '</w>' forms + merges + specials.

    Greedy BPE (Sennrich et al. 2016): repeatedly merge the most frequent adjacent pair (ties: smallest pair),
    counting pairs over the cleaned, pre-split, byte-encoded words of the texts.
    """
    counts = {}
    for text in texts:
        for part in _SPECIALS.split(text)[::2]:
            for piece in SPLIT_PATTERN.findall(clean_text(part)):
                for word in _SPECIAL_AS_TEXT.get(piece, [piece]):
                    counts[word] = counts.get(word, 0) + 1
    words = [[list(w[:-1]) + [w[-1] + "</w>"], c] for w, c in
             ((_byte_encode(p), c) for p, c in sorted(counts.items()))]
    merges = []
    for _ in range(n_merges):
        pairs = {}
        for symbols, c in words:
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] = pairs.get(pair, 0) + c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w in words:
            s, merged, i = w[0], [], 0
            while i < len(s):
                if i < len(s) - 1 and s[i] == best[0] and s[i + 1] == best[1]:
                    merged.append(s[i] + s[i + 1])
                    i += 2
                else:
                    merged.append(s[i])
                    i += 1
            w[0] = merged
    vocab = _base_vocab() + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return _write_vocab(out_dir, vocab, merges)


def tokenizer_folder(spec):
    """The local folder holding vocab.json + merges.txt for a spec: a folder (or its tokenizer/ subfolder), or
    "hf:REPO" (downloads REPO's tokenizer/ folder with huggingface_hub)."""
    spec = str(spec)
    if spec.startswith("hf:"):
        from huggingface_hub import snapshot_download  # lazy: only this path needs the hub
        # an SDXL-style repo keeps them in tokenizer/, a CLIP repo at its root
        spec = snapshot_download(spec[3:], allow_patterns=["vocab.json", "merges.txt", "tokenizer/vocab.json",
                                                           "tokenizer/merges.txt"])
    for folder in (spec, os.path.join(spec, "tokenizer")):
        if os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt")):
            return folder
    raise FileNotFoundError(f"no vocab.json + merges.txt in {spec} (nor in {spec}/tokenizer); "
                            f"use a folder, an open_clip .txt.gz, or hf:REPO")


def load_tokenizer(spec):
    """spec: a folder or "hf:REPO" as in tokenizer_folder, or open_clip's bpe_simple_vocab_16e6.txt.gz."""
    spec = str(spec)
    if spec.endswith(".gz"):
        spec = vocab_from_openclip(spec, tempfile.mkdtemp(prefix="clip_vocab_"))
    folder = tokenizer_folder(spec)
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))


# -----------------------------------------------------------------------------
# synthetic dataset (the offline tiny demo's data, written as ordinary files so it goes through the real loader)

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
           "white": (245, 245, 245), "black": (20, 20, 20), "orange": (245, 140, 30), "purple": (140, 60, 200)}
SHAPES = ("circle", "square", "triangle", "cross", "stripes")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")


def _draw_shape(draw, shape, cx, cy, r, colour):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    elif shape == "cross":
        t = max(1, r // 3)
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=colour)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=colour)
    elif shape == "stripes":  # three horizontal bars filling the shape's box
        band = max(1, (2 * r) // 5)
        for k in range(3):
            y0 = cy - r + 2 * k * band
            draw.rectangle([cx - r, y0, cx + r, y0 + band - 1], fill=colour)


def make_synthetic_dataset(root, n=64, seed=0, sizes=((128, 128), (96, 160), (160, 96), (112, 176))):
    """n PNG + .txt pairs of one coloured shape on a plain background, sizes given as (h, w).

    The default sizes fit make_buckets(area=128 * 128, step=32) = 96x160, 128x128, 160x96 (latents divisible
    by 4, as a 3-level UNet needs); 112x176 lands in 96x160 through resize and crop, like a real photo would.

    Captions read like "a large red circle on a blue background, top left". Deterministic given (n, seed,
    sizes); idempotent: a complete dataset (manifest.json written last) is left alone, a partial one is
    completed, a different one in the same folder is an error rather than a silent mix.
    """
    os.makedirs(root, exist_ok=True)
    manifest = {"kind": "synthetic shapes v1", "n": n, "seed": seed, "sizes": [list(s) for s in sizes]}
    mpath = os.path.join(root, "manifest.json")
    names = [f"{i:05d}" for i in range(n)]
    complete = lambda: all(os.path.exists(os.path.join(root, s + e)) for s in names for e in (".png", ".txt"))
    if os.path.exists(mpath):
        with open(mpath) as f:
            old = json.load(f)
        if old != manifest:
            raise ValueError(f"{root} holds a different synthetic dataset ({old}); delete it or use another root")
        if complete():
            print(f"synthetic dataset: {root} is complete ({n} images), nothing to do")
            return root
    rng = random.Random(seed)
    colours = list(COLOURS)
    written = 0
    for name in names:
        # draw every parameter even for files that exist, so each image depends only on (seed, its number)
        h, w = sizes[rng.randrange(len(sizes))]
        shape, fg = rng.choice(SHAPES), rng.choice(colours)
        bg = rng.choice([c for c in colours if c != fg])
        pos = rng.randrange(len(POSITIONS))
        big = rng.random() < 0.5
        png, txt = os.path.join(root, name + ".png"), os.path.join(root, name + ".txt")
        if os.path.exists(png) and os.path.exists(txt):
            continue
        img = Image.new("RGB", (w, h), COLOURS[bg])
        row, col = divmod(pos, 3)
        cx, cy = w * (1 + 2 * col) // 6, h * (1 + 2 * row) // 6
        r = int(min(h, w) * (0.16 if big else 0.09))
        _draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, COLOURS[fg])
        what = f"{fg} stripes" if shape == "stripes" else f"{fg} {shape}"
        caption = f"a {'large' if big else 'small'} {what} on a {bg} background, {POSITIONS[pos]}"
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        _atomic_write_bytes(png, buf.getvalue())
        _atomic_write_text(txt, caption + "\n")
        written += 1
    _atomic_write_text(mpath, json.dumps(manifest))
    print(f"synthetic dataset: wrote {written} of {n} images to {root}")
    return root


# -----------------------------------------------------------------------------
# aspect buckets

def make_buckets(area=1024 * 1024, step=64, max_aspect=2.5):
    """[(h, w)] sorted by aspect h/w: sides multiples of step, h*w <= area, both orientations, the square.

    For each short side s (a multiple of step) the long side is the largest multiple of step that keeps
    s*long <= area; buckets past max_aspect are dropped. The default 2.5 reaches as far as SDXL's own
    training buckets did (640x1536; here 640x1600, the largest that fits the area).
    """
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
    """Resize-to-cover size, crop (top, left) in the (flipped, if flip) resized image, and whether to flip.

    The crop offset is the one SDXL's micro-conditioning wants: after a horizontal flip the crop's left edge,
    measured in the flipped image, is resized_w - crop_w - left_before_flip.
    """
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


def _hash_bytes(data):
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _item_rng(seed, rel):
    # from a hash, not Python's hash(): stable across processes and independent of the other files
    return random.Random(int.from_bytes(hashlib.blake2b(f"{seed}\0{rel}".encode(), digest_size=8).digest(), "little"))


def _probe_image(path, verify):
    """-> (file bytes hash, (h, w) after EXIF rotation). Raises on anything Pillow cannot fully decode."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError("zero-size file")
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
        if verify:
            # JPEG: decode at 1/8 scale (DCT scaling) -- still reads every entropy-coded byte, so truncation
            # and corruption are caught at a fraction of the cost; other formats decode fully
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            im.load()
    if orientation in (5, 6, 7, 8):  # EXIF rotations by 90 degrees swap the sides
        h, w = w, h
    return _hash_bytes(data), (h, w)


def _read_metadata(root, log=print):
    path = os.path.join(root, "metadata.jsonl")
    if not os.path.exists(path):
        return None
    captions = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    captions[os.path.normpath(row["file_name"])] = str(row.get("text", ""))
                except (ValueError, KeyError, TypeError) as e:
                    log(f"metadata.jsonl line {n}: skipped ({e!r})")
    return captions


def scan_dataset(root, buckets=None, seed=0, crop="center", flip=False, min_pixels=None, verify=True, workers=8,
                 quiet=False):
    """Find every image under root, check it, and plan its bucket, resize, crop and flip -> [Item].

    Images: .png .jpg .jpeg .webp, recursive, sorted by relative path. Captions: root/metadata.jsonl
    (`file_name`, `text`) if present, else the same-stem .txt; none -> empty caption, counted once. Skipped
    with one printed line each: zero-size, unreadable, undecodable or truncated files, and images under
    min_pixels (default: the smallest bucket's area, i.e. images that would need upscaling for any bucket).
    buckets=None plans against make_buckets()'s defaults and skips no size (enough to read the captions).
    quiet=True prints nothing.
    """
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    if buckets is None:
        buckets, min_pixels = make_buckets(), (0 if min_pixels is None else min_pixels)
    min_pixels = min(h * w for h, w in buckets) if min_pixels is None else min_pixels
    log = (lambda *a: None) if quiet else print
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in filenames:
            if fn.lower().endswith(IMAGE_EXTS):
                rels.append(os.path.relpath(os.path.join(dirpath, fn), root))
    rels.sort()
    meta = _read_metadata(root, log)

    def probe(rel):
        try:
            return _probe_image(os.path.join(root, rel), verify), None
        except Exception as e:  # Pillow raises many types (OSError, SyntaxError, DecompressionBombError, ...)
            return None, e

    t0 = time.time()
    with ThreadPoolExecutor(max(1, workers)) as pool:  # Pillow releases the GIL while decoding
        probed = list(pool.map(probe, rels))
    items, skipped, no_caption = [], {}, []
    for rel, (got, err) in zip(rels, probed):
        reason = None
        if err is not None:
            reason = "zero-size file" if str(err) == "zero-size file" else f"cannot read/decode ({type(err).__name__}: {err})"
        elif got[1][0] * got[1][1] < min_pixels:
            reason = f"too small ({got[1][0]}x{got[1][1]} < {min_pixels} pixels, the smallest bucket)"
        if reason:
            log(f"skip {rel}: {reason}")
            kind = reason.split(" (")[0]
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        file_hash, orig_hw = got
        caption = None
        if meta is not None:
            caption = meta.get(os.path.normpath(rel))
        if caption is None:
            txt = os.path.join(root, os.path.splitext(rel)[0] + ".txt")
            if os.path.exists(txt):
                with open(txt, encoding="utf-8", errors="replace") as f:
                    caption = f.read().strip()
        if caption is None:
            no_caption.append(rel)
            caption = ""
        bucket = nearest_bucket(*orig_hw, buckets)
        resized, crop_tl, flipped = plan_crop(orig_hw, bucket, crop, flip, _item_rng(seed, rel))
        items.append(Item(len(items), os.path.join(root, rel), rel, caption, file_hash, orig_hw, bucket,
                          resized, crop_tl, flipped))
    if meta is not None:
        gone = sorted(set(meta) - {os.path.normpath(r) for r in rels})
        if gone:
            log(f"metadata.jsonl lists {len(gone)} files that are not images under {root}, e.g. {gone[0]}")
    if no_caption:
        log(f"{len(no_caption)} images have no caption (trained with an empty caption), e.g. {no_caption[0]}")
    detail = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items()))
    log(f"scan {root}: {len(rels)} image files, {len(items)} kept, {len(rels) - len(items)} skipped"
          f"{' (' + detail + ')' if detail else ''}, {time.time() - t0:.1f}s")
    return items


def print_bucket_histogram(items, global_batch=None):
    counts = {}
    for it in items:
        counts[it.bucket] = counts.get(it.bucket, 0) + 1
    print(f"buckets: {len(items)} images in {len(counts)} buckets")
    top = max(counts.values(), default=1)
    for b in sorted(counts, key=lambda b: b[0] / b[1]):
        n = counts[b]
        note = f"  (< global batch {global_batch}: repeats within the bucket)" if global_batch and n < global_batch else ""
        print(f"  {b[0]:5d}x{b[1]:<5d} aspect {b[1] / b[0]:4.2f} {n:7d} {'#' * max(1, round(40 * n / top))}{note}")


# -----------------------------------------------------------------------------
# decoding and encoding

def _to_rgb(im):
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: scale to 8 bits, convert() would clip
        arr = np.asarray(im).astype(np.float64)
        im = Image.fromarray(np.clip(arr / (257 if arr.max() > 255 else 1), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")  # transparent pixels over white, not over whatever colour they happen to hold
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    return im.convert("RGB")


def load_image(item):
    """Decode item's file and apply its plan: resize to cover (Lanczos), crop, flip -> [3, h, w] in [-1, 1]."""
    with open(item.path, "rb") as f:
        data = f.read()
    if _hash_bytes(data) != item.file_hash:
        raise RuntimeError(f"{item.path} changed since the scan; rescan the dataset")
    (rh, rw), (top, left), (bh, bw) = item.resized_hw, item.crop_tl, item.bucket
    with Image.open(io.BytesIO(data)) as im:
        im = _to_rgb(ImageOps.exif_transpose(im))
    im = im.resize((rw, rh), Image.LANCZOS)
    if item.flip:
        left = rw - bw - left  # crop_tl is measured in the flipped image; cut the same pixels, then mirror
        im = im.crop((left, top, left + bw, top + bh)).transpose(Image.FLIP_LEFT_RIGHT)
    else:
        im = im.crop((left, top, left + bw, top + bh))
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, h, w)
    return x.float() / 127.5 - 1.0


@contextlib.contextmanager
def _fp32(module):
    """Run a module in fp32 (the SDXL VAE overflows in fp16), restoring each tensor's dtype afterwards."""
    if not isinstance(module, torch.nn.Module):
        yield
        return
    named = lambda: list(module.named_parameters()) + list(module.named_buffers())
    dtypes = {name: t.dtype for name, t in named()}
    if all(d == torch.float32 or not d.is_floating_point for d in dtypes.values()):
        yield
        return
    module.float()
    try:
        yield
    finally:
        for name, t in named():  # by name: .float() replaces buffer objects (parameters keep theirs)
            t.data = t.data.to(dtypes[name])


def encode_images(vae, items, device="cpu", pool=None):
    """VAE encoder mean, fp32, unscaled, on the CPU: [B, C, h/8, w/8] for same-bucket items."""
    images = list(pool.map(load_image, items)) if pool else [load_image(it) for it in items]
    x = torch.stack(images).to(device)
    with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False), _fp32(vae):
        mean, _ = vae.encode(x)
    return mean.float().cpu()


def tokenize(tokenizer, captions, pad2=0):
    """(tokens for te1 padded with EOS, tokens for te2 padded with pad2 = 0, "!", as in SDXL's tokenizer_2)."""
    return tokenizer(captions), tokenizer(captions, pad_id=pad2)


def encode_captions(encode_text, tokens1, tokens2, device="cpu"):
    with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
        context, pooled = encode_text(tokens1.to(device), tokens2.to(device))
    return context.float().cpu(), pooled.float().cpu()


def weights_fingerprint(*modules, n_sample=8):
    """A cheap hash of modules' weights: every name and shape, plus a strided sample of values of n_sample
    evenly spaced tensors (a fine-tune moves every tensor, so a sample catches it). Part of cache keys."""
    h = hashlib.blake2b(digest_size=16)
    for m in modules:
        sd = m.state_dict()
        names = sorted(sd)
        for k in names:
            h.update(f"{k}:{tuple(sd[k].shape)};".encode())
        for k in names[:: max(1, len(names) // n_sample)]:
            t = sd[k]
            if t.is_meta or not t.is_floating_point():
                continue
            flat = t.detach().reshape(-1)
            flat = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous()  # fp32 values: dtype-blind
            h.update(flat.numpy().tobytes())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# cache: one safetensors file per entry, content-addressed

def _latent_key(item, vae_fp):
    spec = f"latent v1|{item.file_hash}|{item.bucket}|{item.resized_hw}|{item.crop_tl}|{item.flip}|lanczos|{vae_fp}"
    return _hash_bytes(spec.encode())


def _text_key(t1, t2, text_fp):
    # keyed by the token ids rather than the caption: a tokenizer change invalidates, equal tokens share
    return _hash_bytes(b"text v1|" + t1.numpy().tobytes() + b"|" + t2.numpy().tobytes() + b"|" + text_fp.encode())


class Cache:
    """Cached VAE means (unscaled) and text embeddings of a list of items, kept in RAM up to ram_gb.

    Files: cache_dir/latents/ab/<key>.safetensors ("mean" [C, h, w]) and cache_dir/text/ab/<key>.safetensors
    ("context" [77, D], "pooled" [P]), all fp32, keys from _latent_key / _text_key. A key that changes (new
    image bytes, bucket, crop, flip, weights, tokens) names a new file, so stale entries are never read.
    """

    def __init__(self, cache_dir, lat_keys, txt_keys, ram_gb=8.0):
        self.dir = cache_dir
        self.lat_keys, self.txt_keys = lat_keys, txt_keys  # item.index -> key
        self.ram, self.ram_used, self.ram_bytes = {}, 0, int(ram_gb * 2 ** 30)

    def path(self, kind, key):
        return os.path.join(self.dir, kind, key[:2], key + ".safetensors")

    def keep(self, kind, key, tensors):
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if (kind, key) not in self.ram and self.ram_used + size <= self.ram_bytes:
            self.ram[(kind, key)] = tensors
            self.ram_used += size

    def check(self, kind, key, shapes, full=True):
        """None if the file exists and holds finite fp32 tensors of the expected shapes; else why not."""
        path = self.path(kind, key)
        if not os.path.exists(path):
            return "missing"
        try:
            if not full:  # header only: names, shapes, dtypes, key
                with safe_open(path, "pt") as f:
                    if (f.metadata() or {}).get("key") != key:
                        return "wrong key"
                    got = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
                want = {k: (tuple(s), "F32") for k, s in shapes.items()}
                return None if got == want else f"expected {want}, found {got}"
            with safe_open(path, "pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return "wrong key"
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            return f"unreadable ({type(e).__name__}: {e})"
        got = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
        want = {k: (tuple(s), torch.float32) for k, s in shapes.items()}
        if got != want:
            return f"expected {want}, found {got}"
        if not all(torch.isfinite(v).all() for v in tensors.values()):
            return "non-finite values"
        self.keep(kind, key, tensors)  # the check read it anyway
        return None

    def write(self, kind, key, tensors):
        path = self.path(kind, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"key": key})
        os.replace(tmp, path)
        self.keep(kind, key, tensors)

    def read(self, kind, key):
        got = self.ram.get((kind, key))
        if got is None:
            got = load_file(self.path(kind, key))
            self.keep(kind, key, got)
        return got

    def load(self, items):
        """-> (mean [B, C, h, w] unscaled, context [B, 77, D], pooled [B, P]), fp32."""
        lat = [self.read("latents", self.lat_keys[it.index])["mean"] for it in items]
        txt = [self.read("text", self.txt_keys[it.index]) for it in items]
        return (torch.stack(lat), torch.stack([t["context"] for t in txt]), torch.stack([t["pooled"] for t in txt]))


class OnTheFly:
    """The Cache.load interface without a cache: decode and encode every time (tests; a few-image debug run)."""

    def __init__(self, encoders, tokenizer, device="cpu"):
        self.encoders, self.tokenizer, self.device = encoders, tokenizer, device

    def load(self, items):
        mean = encode_images(self.encoders.vae, items, self.device)
        context, pooled = encode_captions(self.encoders.encode_text,
                                          *tokenize(self.tokenizer, [it.caption for it in items]), device=self.device)
        return mean, context, pooled


class _Progress:
    def __init__(self, what, total):
        self.what, self.total, self.done, self.t0, self.last = what, total, 0, time.time(), 0.0

    def step(self, n):
        self.done += n
        now = time.time()
        if self.done == self.total or now - self.last > 10:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"cache {self.what}: {self.done}/{self.total} ({100 * self.done / self.total:.0f}%) "
                  f"{rate:.1f}/s eta {eta:.0f}s")


def _fingerprints(encoders, vae_fp, text_fp):
    if vae_fp is None:
        vae_fp = weights_fingerprint(encoders.vae)
    if text_fp is None:
        if not (hasattr(encoders, "te1") and hasattr(encoders, "te2")):
            raise ValueError("encoders has no te1/te2 to fingerprint: pass text_fp (weights_fingerprint of the text encoders)")
        text_fp = weights_fingerprint(encoders.te1, encoders.te2)  # not the whole model: the UNet trains
    return vae_fp, text_fp


def build_cache(items, encoders, tokenizer, cache_dir, device="cpu", batch_size=8, rank=0, world=1, vae_fp=None,
                text_fp=None, verify=True, ram_gb=8.0, workers=8):
    """Make sure every item's VAE mean and text embedding is cached; return the Cache.

    encoders: the SDXL model (or a stand-in) with .vae.encode(img [B,3,H,W] in [-1,1]) -> (mean, logvar), run
    here in fp32, and .encode_text(tokens1, tokens2) -> (context [B,77,D], pooled [B,P]). vae_fp / text_fp
    default to weights_fingerprint(encoders.vae) and weights_fingerprint(encoders.te1, encoders.te2).
    Existing files are checked (verify=True: read fully, shape + finite; False: header only) and missing or
    corrupt ones encoded, latents in same-bucket batches of batch_size, captions in batches of 4x that.
    Under DDP each rank encodes its share of the work, then waits for the others (a barrier).
    """
    vae, encode_text = encoders.vae, encoders.encode_text
    vae_fp, text_fp = _fingerprints(encoders, vae_fp, text_fp)
    cache_dir = os.path.abspath(cache_dir)
    distributed = world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed:  # no process group: nobody else would do the other shares
        rank, world = 0, 1
    image_dirs = {os.path.dirname(it.path) for it in items}
    assert cache_dir not in image_dirs, f"cache dir {cache_dir} is an image folder; keep the cache elsewhere"
    # expected shapes, from one tiny probe of each encoder
    probe = torch.zeros(1, 3, 64, 64, device=device)
    with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False), _fp32(vae):
        z = vae.encode(probe)[0]
    channels, factor = z.shape[1], 64 // z.shape[-1]
    ctx0, pooled0 = encode_captions(encode_text, *tokenize(tokenizer, [""]), device=device)
    text_shapes = {"context": tuple(ctx0.shape[1:]), "pooled": tuple(pooled0.shape[1:])}

    tokens1, tokens2 = tokenize(tokenizer, [it.caption for it in items])
    lat_keys = {it.index: _latent_key(it, vae_fp) for it in items}
    txt_keys = {it.index: _text_key(tokens1[i], tokens2[i], text_fp) for i, it in enumerate(items)}
    cache = Cache(cache_dir, lat_keys, txt_keys, ram_gb)

    # latents: unique keys, grouped by bucket so a batch is one tensor shape
    lat_jobs = {}
    for it in items:
        lat_jobs.setdefault(lat_keys[it.index], it)
    txt_jobs = {}
    for i, it in enumerate(items):
        txt_jobs.setdefault(txt_keys[it.index], (tokens1[i], tokens2[i]))

    def lat_shape(it):
        return {"mean": (channels, it.bucket[0] // factor, it.bucket[1] // factor)}

    def scan(kind, jobs, shape_of):
        todo, bad = [], 0
        for key, job in jobs.items():
            why = cache.check(kind, key, shape_of(job), full=verify)
            if why is not None:
                if why != "missing":
                    bad += 1
                    print(f"cache: {cache.path(kind, key)} is corrupt ({why}); recomputing")
                todo.append(key)
        print(f"cache {kind}: {len(jobs)} entries, {len(jobs) - len(todo)} cached, {len(todo) - bad} missing, "
              f"{bad} corrupt")
        return todo

    def encode_all(kind, chunks, encode_batch):
        if chunks:
            progress = _Progress(kind, sum(map(len, chunks)))
            for chunk in chunks:
                for key, tensors in zip(chunk, encode_batch(chunk)):
                    cache.write(kind, key, tensors)
                progress.step(len(chunk))

    def encode_lat(keys):  # keys of one bucket
        mean = encode_images(vae, [lat_jobs[k] for k in keys], device, pool)
        return [{"mean": m.clone()} for m in mean]  # clone: one small storage per entry, not views of the batch

    def encode_txt(keys):
        t1 = torch.stack([txt_jobs[k][0] for k in keys])
        t2 = torch.stack([txt_jobs[k][1] for k in keys])
        context, pooled = encode_captions(encode_text, t1, t2, device)
        return [{"context": c.clone(), "pooled": p.clone()} for c, p in zip(context, pooled)]

    lat_bucket = lambda k: lat_jobs[k].bucket
    lat_todo = sorted(scan("latents", lat_jobs, lat_shape), key=lambda k: (lat_jobs[k].bucket, lat_jobs[k].index))
    lat_chunks = _same_bucket_chunks(lat_todo, lat_bucket, batch_size)
    txt_todo = scan("text", txt_jobs, lambda job: text_shapes)
    txt_chunks = [txt_todo[i:i + 4 * batch_size] for i in range(0, len(txt_todo), 4 * batch_size)]
    if distributed:  # every rank must have scanned before anyone writes, or their to-do lists (the shares) differ
        torch.distributed.barrier()
    with ThreadPoolExecutor(max(1, workers)) as pool:  # decodes a batch's images in parallel
        encode_all("latents", [c for i, c in enumerate(lat_chunks) if i % world == rank], encode_lat)
        encode_all("text", [c for i, c in enumerate(txt_chunks) if i % world == rank], encode_txt)
        if distributed:
            torch.distributed.barrier()
            # check what the other ranks wrote; anything still missing (a rank failed) we encode ourselves
            others = [k for i, c in enumerate(lat_chunks) if i % world != rank for k in c]
            redo = [k for k in others if cache.check("latents", k, lat_shape(lat_jobs[k]), full=verify)]
            encode_all("latents", _same_bucket_chunks(redo, lat_bucket, batch_size), encode_lat)
            others = [k for i, c in enumerate(txt_chunks) if i % world != rank for k in c]
            redo = [k for k in others if cache.check("text", k, text_shapes, full=verify)]
            encode_all("text", [redo[i:i + 4 * batch_size] for i in range(0, len(redo), 4 * batch_size)], encode_txt)
    return cache


def _same_bucket_chunks(keys, bucket_of, size):
    """Consecutive runs of keys (sorted by bucket) cut into chunks of <= size that never span two buckets."""
    chunks, cur = [], []
    for k in keys:
        if cur and (len(cur) == size or bucket_of(k) != bucket_of(cur[0])):
            chunks.append(cur)
            cur = []
        cur.append(k)
    if cur:
        chunks.append(cur)
    return chunks


# -----------------------------------------------------------------------------
# the batch loader

def collate(items, source, dropped=None, vae_scale=VAE_SCALE):
    """One batch dict from a list of items: latents (mean x vae_scale), context, pooled, time_ids, index,
    dropped. Dropped samples get zeroed context and pooled (the sampler's unconditional branch)."""
    dropped = torch.zeros(len(items), dtype=torch.bool) if dropped is None else dropped
    # load() returns freshly stacked tensors (never the cached ones), so in-place edits are safe and save
    # a copy of the biggest tensor in the batch (context is 77x2048 floats per image in SDXL)
    mean, context, pooled = source.load(items)
    context[dropped] = 0.0
    pooled[dropped] = 0.0
    time_ids = torch.tensor([[*it.orig_hw, *it.crop_tl, *it.bucket] for it in items], dtype=torch.float32)
    return {"latents": mean.mul_(vae_scale), "context": context, "pooled": pooled, "time_ids": time_ids,
            "index": torch.tensor([it.index for it in items], dtype=torch.long), "dropped": dropped}


class Loader:
    """Single-bucket batches in an order that depends only on (seed, epoch, global batch), resumable exactly.

    Each epoch: every bucket's items are shuffled and cut into global batches (batch_size * world); a bucket's
    last, short batch is filled with its own items again, so under-filled buckets repeat and nothing is
    dropped; then the batches are shuffled. Rank r takes slots [r*B, (r+1)*B) of every global batch, so ranks
    are disjoint and together give exactly the world=1 run with batch B*world. Caption dropout is drawn for the
    whole global batch from a torch.Generator that is part of state_dict(), so every rank agrees and resume
    is exact.

    source: a Cache (from build_cache) or OnTheFly, anything with .load(items) -> (mean, context, pooled) that
    returns new tensors (they are edited in place).
    Batches: latents [B,C,h,w] fp32 (mean * vae_scale), context [B,77,D], pooled [B,P] (both zero where
    dropped), time_ids [B,6] = (orig_h, orig_w, crop_top, crop_left, target_h, target_w), index [B] (item
    ids), dropped [B] bool.
    """

    def __init__(self, items, source, batch_size, rank=0, world=1, seed=0, caption_dropout=0.1, vae_scale=VAE_SCALE,
                 verbose=True):
        assert items, "no images to train on"
        assert 0 <= rank < world, (rank, world)
        self.items, self.source, self.batch_size, self.rank, self.world = list(items), source, batch_size, rank, world
        self.global_batch = batch_size * world  # divisible by world by construction
        self.seed, self.caption_dropout, self.vae_scale = seed, caption_dropout, vae_scale
        self.by_bucket = {}
        for pos, it in enumerate(self.items):
            self.by_bucket.setdefault(tuple(it.bucket), []).append(pos)
        self.epoch, self.position = 0, 0
        self.gen = torch.Generator().manual_seed(seed)
        self._plan = (None, None)
        if rank == 0 and verbose:
            print_bucket_histogram(self.items, self.global_batch)
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
        G, B, r = self.global_batch, self.batch_size, self.rank
        slots = batches[self.position]
        drop = torch.rand(G, generator=self.gen) < self.caption_dropout  # whole global batch: ranks agree
        self.position += 1
        items = [self.items[p] for p in slots[r * B:(r + 1) * B]]
        return collate(items, self.source, drop[r * B:(r + 1) * B], self.vae_scale)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "dropout_rng": self.gen.get_state(),
                "seed": self.seed, "global_batch": self.global_batch, "n_items": len(self.items)}

    def load_state_dict(self, sd):
        if sd["seed"] != self.seed or sd["global_batch"] != self.global_batch:
            raise ValueError(f"data state was saved with seed {sd['seed']}, global batch {sd['global_batch']}; "
                             f"this run has seed {self.seed}, global batch {self.global_batch}: the order differs")
        if sd["n_items"] != len(self.items):
            print(f"warning: dataset had {sd['n_items']} items when saved, now {len(self.items)}: order differs")
        self.epoch, self.position = int(sd["epoch"]), int(sd["position"])
        self.gen.set_state(sd["dropout_rng"])


# -----------------------------------------------------------------------------
# small file helpers

def _atomic_write_bytes(path, data):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _atomic_write_text(path, text):
    _atomic_write_bytes(path, text.encode("utf-8"))
