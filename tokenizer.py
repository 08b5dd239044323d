"""
The CLIP BPE tokenizer (Radford et al. 2021; Sennrich et al. 2016), one vocabulary for both SDXL text encoders,
written from scratch so no runtime file needs transformers or open_clip (docs/sdxl_format.md §5).

    tok = load_tokenizer("hf:stabilityai/stable-diffusion-xl-base-1.0")   # or a folder with vocab.json + merges.txt
    ids = tok(["a photo of a cat"], pad_id=None)     # LongTensor [B, 77]: BOS, tokens, EOS, pads (EOS by default)
    tokens1, tokens2 = tokenize(tok, captions)       # te1 pads with EOS, te2 with 0 (SDXL's tokenizer_2)
    tokens1, tokens2 = tokenize(tok, captions, max_token_length=225)   # [B, 3 x 77]: three 77-token chunks

Text cleaning follows transformers-5's CLIPTokenizer (NFC, whitespace runs -> one space, lower-case), not
open_clip's ftfy + html.unescape: ids equal transformers' on every prompt tested, and differ from open_clip's on
ligatures, fullwidth forms, curly quotes and HTML entities, which ftfy rewrites.
"""
import json
import os
import unicodedata
from functools import lru_cache

import regex
import torch

from configurator import UserError, UserFileNotFound

CONTEXT_LENGTH = 77  # BOS + 75 tokens + EOS
MAX_TOKEN_LENGTHS = (75, 150, 225)  # caption tokens: 1, 2 or 3 chunks of CONTEXT_LENGTH (docs/sdxl_format.md §8)
MAX_WORD_TOKENS = 8  # ComfyUI's max_word_length: a word of fewer tokens is never cut between two chunks

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
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


def clean_text(text):
    """transformers-5 CLIPTokenizer normaliser: NFC, whitespace runs -> one space, lower-case."""
    text = unicodedata.normalize("NFC", text)
    text = _WHITESPACE.sub(" ", text)  # cosmetic: the pre-split drops whitespace (no str.strip(): see SPLIT_PATTERN)
    # Python's lower() turns a word-final capital sigma into final-form "ς"; the tokenizers library lowers
    # char by char (always "σ"). Lower it ourselves first so the ids match.
    return text.replace("Σ", "σ").lower()


def _byte_encode(piece):
    enc = bytes_to_unicode()
    return "".join(enc[b] for b in piece.encode("utf-8"))


def _read_merges(path):
    """merges.txt -> [(a, b), ...]: the '#version' header, then one pair per line, split on whitespace as
    transformers does (CRLF line ends pass). A ValueError names the first line that is not that."""
    with open(path, encoding="utf-8-sig") as f:  # (a BOM before the header: transformers skips that line anyway)
        lines = f.read().split("\n")
    if not lines[0].startswith("#version"):
        # transformers drops line 1 whatever it holds: without the header it would lose the first merge
        raise ValueError(f"merges.txt line 1 is {lines[0][:40]!r}, not the '#version: ...' header")
    while len(lines) > 1 and not lines[-1].strip():
        lines.pop()  # the file's last newline(s)
    merges = []
    for n, line in enumerate(lines[1:], start=2):
        pair = tuple(line.split())
        if len(pair) != 2:
            raise ValueError(f"merges.txt line {n} is {line[:40]!r}, not two symbols separated by a space")
        merges.append(pair)
    return merges


def clip_vocab(merges):
    """The vocabulary CLIP builds from its merges (OpenAI's simple_tokenizer; SDXL's vocab.json is this): ids in
    the order byte symbols, the same with '</w>', each merge's result, the two specials (a repeat keeps its id)."""
    symbols = list(bytes_to_unicode().values())
    symbols += [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    return vocab


def check_vocabulary(vocab, merges):
    """Why vocab (token -> id) and merges are not one CLIP vocabulary, or None: a garbled or cut merges.txt, or a
    vocab.json of another vocabulary, would otherwise give every caption other ids, silently."""
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and type(v) is int for k, v in vocab.items()):
        return "vocab.json is not an object of token -> integer id"
    made = set(bytes_to_unicode().values())
    made |= {c + "</w>" for c in made}
    for n, (a, b) in enumerate(merges, start=2):
        if a not in made or b not in made:
            return f"merges.txt line {n} ({a} {b}) joins a symbol that neither a byte nor an earlier merge makes"
        made.add(a + b)
    want = clip_vocab(merges)
    if vocab == want:
        return None
    if len(vocab) != len(want):
        return (f"vocab.json has {len(vocab)} tokens, but the 512 byte symbols, {len(merges)} merges and 2 specials "
                f"of merges.txt make {len(want)}: one of the files is cut short or belongs to another vocabulary")
    bad = next(k for k in want if vocab.get(k) != want[k])
    got = "no id" if bad not in vocab else f"the id {vocab[bad]}"
    return (f"vocab.json gives {bad!r} {got}, but merges.txt makes it id {want[bad]} (CLIP's ids follow from its "
            f"merges): the two files do not belong together")


def merge_pair(symbols, pair):
    """symbols with every occurrence of the adjacent pair joined into one symbol, left to right."""
    merged, i = [], 0
    while i < len(symbols):
        if i < len(symbols) - 1 and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


class CLIPTokenizer:
    """CLIP BPE tokenizer from a vocab.json + merges.txt pair (the SDXL repo's tokenizer/ folder); a UserError if
    they do not make one vocabulary. BOS/EOS ids are read from the vocabulary, so small vocabularies
    (demo.build_tiny_vocab) work the same way."""

    def __init__(self, vocab_path, merges_path):
        where = f"tokenizer {os.path.dirname(os.path.abspath(vocab_path))}"
        try:
            with open(vocab_path, encoding="utf-8") as f:
                self.vocab = json.load(f)
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: vocab.json is not UTF-8 text (byte {e.start}); use an intact copy") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: vocab.json is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); it "
                            f"is damaged or cut short: use an intact copy") from None
        try:
            merges = _read_merges(merges_path)
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: merges.txt is not UTF-8 text (byte {e.start}); use an intact copy") from None
        except ValueError as e:
            raise UserError(f"{where}: {e}; the file is damaged: use an intact copy") from None
        why = check_vocabulary(self.vocab, merges)
        if why:
            raise UserError(f"{where}: {why}; use an intact vocab.json + merges.txt pair")
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.bos, self.eos = self.vocab[BOS_TOKEN], self.vocab[EOS_TOKEN]
        self.vocab_size = len(self.vocab)
        self.cache = {}  # piece (after cleaning and pre-split) -> ids

    def bpe(self, word):
        """Byte-level word (str) -> list of BPE symbols, the last one ending in '</w>' (CLIP's algorithm)."""
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            ranked = [(self.ranks[pair], pair) for pair in zip(symbols, symbols[1:]) if pair in self.ranks]
            if not ranked:
                break
            symbols = merge_pair(symbols, min(ranked)[1])  # the pair merged earliest in training
        return symbols

    def piece_ids(self, piece):
        """ids of one pre-split piece (cached)."""
        got = self.cache.get(piece)
        if got is None:
            # an unknown symbol only comes from a malformed vocabulary: EOS, like transformers' unk
            got = [self.vocab.get(s, self.eos) for word in _SPECIAL_AS_TEXT.get(piece, [piece])
                   for s in self.bpe(_byte_encode(word))]
            if len(self.cache) < 500_000:  # bound the memory a stream of unique junk words can take
                self.cache[piece] = got
        return got

    def encode(self, text):
        """text -> token ids, without BOS/EOS and without truncation."""
        return [i for word in self.encode_words(text) for i in word]

    def encode_words(self, text):
        """text -> token ids grouped by whitespace-separated word, [[ids of word 1], [ids of word 2], ...]: the
        long-prompt layout keeps a short word in one chunk (chunk_words)."""
        words, gap = [], True  # gap: whitespace (or the start) since the last piece

        def add(ids):
            nonlocal gap
            if gap:
                words.append([])
                gap = False
            words[-1].extend(ids)

        for k, part in enumerate(_SPECIALS.split(text)):
            if k % 2:  # a special token, written literally in the prompt
                add([self.vocab[part]])
                continue
            part, end = clean_text(part), 0
            for m in SPLIT_PATTERN.finditer(part):
                gap = gap or m.start() > end  # the pre-split matches every character but whitespace
                add(self.piece_ids(m.group()))
                end = m.end()
            gap = gap or end < len(part)
        return words

    def __call__(self, texts, pad_id=None, length=CONTEXT_LENGTH, chunks=1):
        """-> LongTensor [B, chunks * length]: per chunk BOS, tokens, EOS, then pad_id (default EOS), laid out by
        chunk_words (the long-prompt layout, docs/sdxl_format.md §8); chunks=1 truncates to length - 2 tokens."""
        if isinstance(texts, str):
            texts = [texts]
        pad = self.eos if pad_id is None else pad_id
        rows = []
        for text in texts:
            row = []
            for part in chunk_words(self.encode_words(text), chunks, length - 2):
                ids = [self.bos] + part + [self.eos]
                row += ids + [pad] * (length - len(ids))
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), chunks * length)


def tokenizer_folder(spec):
    """The local folder holding vocab.json + merges.txt for a spec: a folder (or its tokenizer/ subfolder), or
    "hf:REPO" (downloads REPO's tokenizer/ folder with huggingface_hub)."""
    spec = str(spec)
    if spec.startswith("hf:"):
        if spec[3:].count("/") != 1 or not all(spec[3:].split("/")):
            raise UserError(f"tokenizer {spec!r}: a hub tokenizer is named hf:OWNER/NAME")
        from huggingface_hub import snapshot_download  # lazy: only this path needs the hub
        try:  # an SDXL-style repo keeps them in tokenizer/, a CLIP repo at its root
            spec = snapshot_download(spec[3:], allow_patterns=["vocab.json", "merges.txt", "tokenizer/vocab.json",
                                                               "tokenizer/merges.txt"])
        except Exception as e:  # offline, no such repo, no access
            raise UserError(f"cannot fetch the tokenizer {spec} ({type(e).__name__}); check the name and the "
                            "network, or pass a folder holding vocab.json and merges.txt") from None
    for folder in (spec, os.path.join(spec, "tokenizer")):
        if os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt")):
            return folder
    raise UserFileNotFound(f"tokenizer: no vocab.json + merges.txt in {spec} (nor in {spec}/tokenizer); "
                           f"use such a folder, or hf:REPO")


def load_tokenizer(spec):
    """spec: a folder or "hf:REPO", as in tokenizer_folder."""
    folder = tokenizer_folder(spec)
    try:
        return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    except OSError as e:  # unreadable (no permission, a folder named vocab.json)
        raise UserError(f"tokenizer {folder}: cannot read {e.filename} ({e.strerror})") from None


def token_chunks(max_token_length):
    """max_token_length 75 | 150 | 225 -> 1 | 2 | 3 chunks of 77 positions."""
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise UserError(f"config error: --max_token_length={max_token_length!r} is not one of "
                        f"{' | '.join(map(str, MAX_TOKEN_LENGTHS))}")
    return max_token_length // (CONTEXT_LENGTH - 2)


def context_positions(max_token_length):
    """The text context's length the UNet sees: 77, 154 or 231 positions."""
    return token_chunks(max_token_length) * CONTEXT_LENGTH


def chunk_words(words, chunks, size=CONTEXT_LENGTH - 2):
    """Word token groups (CLIPTokenizer.encode_words) -> `chunks` lists of at most `size` ids each, the layout
    ComfyUI samples with (comfy/sd1_clip.py): a word that does not fit in what is left of a chunk starts the next
    one whole when it has fewer than MAX_WORD_TOKENS tokens, else is cut across the two; the last chunk truncates.
    chunks=1 is plain truncation to `size` tokens."""
    out = [[]]
    for word in words:
        long = len(word) >= MAX_WORD_TOKENS  # decided once per word, as ComfyUI does
        while word:
            room = size - len(out[-1])
            if len(word) <= room:
                out[-1] += word
                break
            last = len(out) == chunks
            if long or last:
                out[-1] += word[:room]
                word = word[room:]
            if last:
                return out
            out.append([])  # a short word moves to the next chunk whole
    return out + [[] for _ in range(chunks - len(out))]


def tokenize(tok, captions, pad2=0, max_token_length=75):
    """(ids for te1 padded with EOS, ids for te2 padded with pad2 = 0, "!", as SDXL's tokenizer_2 does), each
    [B, 77 n] with n = max_token_length / 75 chunks; a chunk the caption does not reach is the empty caption's."""
    n = token_chunks(max_token_length)
    return tok(captions, chunks=n), tok(captions, pad_id=pad2, chunks=n)
