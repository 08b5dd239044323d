"""
What the offline demo (config/tiny.py) makes when it is missing, so that `python train.py config/tiny.py` runs
with nothing downloaded: a synthetic captioned dataset written as ordinary PNG + .txt files (so it goes through
the real scan, cache and loader), a small BPE vocabulary learned from its captions, and a tiny random start
checkpoint with SDXL's topology in the real single-file layout. Nothing here is used by a run on real data.
"""
import io
import json
import os
import random

from PIL import Image, ImageDraw

import checkpoint
import files
import model
from configurator import UserError
from tokenizer import (_SPECIAL_AS_TEXT, _SPECIALS, BOS_TOKEN, EOS_TOKEN, SPLIT_PATTERN, _byte_encode, bytes_to_unicode,
                       clean_text, merge_pair)


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
            raise UserError(f"{root} holds a different synthetic dataset ({old}); delete it or use another folder")
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
        files.write_bytes(png, buf.getvalue())
        files.write_text(txt, caption + "\n")
        written += 1
    files.write_json(mpath, manifest)
    print(f"synthetic dataset: wrote {written} of {n} images to {root}")
    return root


def _write_vocab(out_dir, vocab_list, merges):
    vocab = {}
    for tok in vocab_list:
        vocab.setdefault(tok, len(vocab))  # a duplicate (two merges giving one string) keeps its first id
    files.write_json(os.path.join(out_dir, "vocab.json"), vocab, ensure_ascii=False)
    files.write_text(os.path.join(out_dir, "merges.txt"),
                       "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return out_dir


def _base_vocab():
    chars = list(bytes_to_unicode().values())
    return chars + [c + "</w>" for c in chars]


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
            w[0] = merge_pair(w[0], best)
    vocab = _base_vocab() + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return _write_vocab(out_dir, vocab, merges)


def make_tiny_start(path):
    """A tiny SDXL-topology checkpoint with random weights, saved in the real sgm layout (the demo's 'SDXL base')."""
    sdxl = model.SDXL(model.SDXLConfig.tiny())
    model.init_random_(sdxl, seed=0)
    checkpoint.save_checkpoint(sdxl, path, v_pred=False, ztsnr=False, metadata={"note": "tiny random start"})
    print(f"wrote a tiny random SDXL-topology start checkpoint to {path}")
