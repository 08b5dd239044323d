"""
The real CLIP vocabulary for tests, offline: the open_clip_torch wheel ships it as bpe_simple_vocab_16e6.txt.gz
(`pip install --no-deps open_clip_torch`, never imported), and these write the same vocab.json + merges.txt as
SDXL's tokenizer/ folder from it.
"""
import gzip
import os

from demo import _base_vocab, _write_vocab
from tokenizer import BOS_TOKEN, EOS_TOKEN


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
