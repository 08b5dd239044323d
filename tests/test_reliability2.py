"""
Bad input and faults outside the training loop: caches and vocabularies are proven before use, a full disk under
the sharded checkpoint and a damaged DCP index are one line, temp files of a dead process are found and removed,
sample_ablation.py never replaces what it did not write and stops cleanly, and the configurator expands '~',
reads config files as Python does and treats SIGHUP like SIGTERM. The rules are test_reliability.py's: a user's
mistake is one line on stderr and exit status 2, before any heavy work where the config or the files show it.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import cache
import checkpoint
import configurator
import demo
import files
import model
import tokenizer
from configurator import UserError
from test_reliability import one_line, snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a red circle on a blue background", "a photo of a cat", "a green square on a white background"]


def python(code, *args, env=None, preexec_fn=None):
    """Run code (a script's text) in a fresh interpreter from the repo root."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=None if env is None else {**os.environ, **env},
                          preexec_fn=preexec_fn)


# -----------------------------------------------------------------------------
# caches and vocabularies

def test_weights_fingerprint_sees_every_tensor():
    # SDXL's tensors (the VAE's 248 included) at toy widths: a fingerprint per changed tensor stays cheap
    vae_cfg = model.VAEConfig(ch=4, num_groups=4)
    vae = model.init_random_(model.VAE(vae_cfg), seed=0)
    te1 = model.init_random_(model.CLIPTextEncoder(model.TextConfig(vocab_size=50, width=16, layers=3, mlp_dim=32,
                                                                    head_dim=8)), seed=1)
    te2 = model.init_random_(model.OpenCLIPTextEncoder(model.TextConfig(vocab_size=50, width=16, layers=3, mlp_dim=32,
                                                                        head_dim=8, act="gelu", proj_dim=8)), seed=2)
    assert len(vae.state_dict()) == 248
    base_vae, base_text = cache.weights_fingerprint(vae), cache.weights_fingerprint(te1, te2)
    missed = []
    with torch.no_grad():
        for m, mods, base in ((vae, (vae,), base_vae), (te1, (te1, te2), base_text), (te2, (te1, te2), base_text)):
            for name, t in m.state_dict().items():
                if not t.is_floating_point():
                    continue
                flat = t.view(-1)
                i = flat.numel() // 2 + 1 if flat.numel() > 2 else 0  # away from any evenly strided sample
                old = flat[i].item()
                flat[i] = old + 1.0
                if cache.weights_fingerprint(*mods) == base:
                    missed.append(name)
                flat[i] = old
    assert not missed, f"a change to {len(missed)} tensors is not seen, e.g. {missed[:3]}"
    assert cache.weights_fingerprint(vae) == base_vae  # and restored, it is the same again
    # the same values in fp16 hash alike (the encoders always run in fp32); the modules' order counts
    vae16 = model.VAE(vae_cfg)
    vae.half()
    vae16.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
    assert cache.weights_fingerprint(vae) == cache.weights_fingerprint(vae16)
    assert cache.weights_fingerprint(te2, te1) != base_text


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """An intact tiny vocabulary's (vocab.json text, merges.txt text)."""
    d = str(tmp_path_factory.mktemp("vocab"))
    demo.build_tiny_vocab(d, CAPTIONS * 3 + ["zebra crossing at night", "a cat's cradle"])
    read = lambda name: open(os.path.join(d, name), encoding="utf-8").read()
    return read("vocab.json"), read("merges.txt")


def _write_vocab(folder, vocab_text, merges_text):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "wb") as f:
        f.write(vocab_text if isinstance(vocab_text, bytes) else vocab_text.encode("utf-8"))
    with open(os.path.join(folder, "merges.txt"), "wb") as f:
        f.write(merges_text if isinstance(merges_text, bytes) else merges_text.encode("utf-8"))
    return folder


def test_damaged_vocabularies_are_refused(vocab, tmp_path):
    vocab_text, merges_text = vocab
    tok = tokenizer.load_tokenizer(_write_vocab(str(tmp_path / "ok"), vocab_text, merges_text))
    lines = merges_text.split("\n")
    assert lines[0].startswith("#version") and len(lines) > 50
    v = json.loads(vocab_text)
    a, b = sorted(k for k in v if k.endswith("</w>") and len(k) > 5)[:2]
    moved = dict(v, **{a: v[b], b: v[a]})
    cases = {
        "merges.txt cut at a line": (vocab_text, "\n".join(lines[:40]) + "\n", "cut short"),
        "merges.txt cut inside a line": (vocab_text, merges_text[:merges_text.index(" ", len(merges_text) // 2)],
                                         "not two symbols"),
        "merges.txt without its header": (vocab_text, "\n".join(lines[1:]), "header"),
        "two merges swapped": (vocab_text, "\n".join(lines[:20] + [lines[30]] + lines[21:30] + [lines[20]] + lines[31:]),
                               "do not belong together|earlier merge"),
        "a merge garbled": (vocab_text, "\n".join(lines[:10] + ["qqqq zzzz</w>"] + lines[11:]), "earlier merge"),
        "merges.txt not UTF-8": (vocab_text, merges_text.encode("utf-8")[:200] + b"\xff" + merges_text.encode()[200:],
                                 "not UTF-8"),
        "vocab.json cut short": (vocab_text[:len(vocab_text) // 2], merges_text, "not valid JSON"),
        "vocab.json with two ids swapped": (json.dumps(moved), merges_text, "do not belong together"),
        "vocab.json of another vocabulary": (json.dumps({**v, "extra": len(v)}), merges_text, "make"),
    }
    for name, (vt, mt, needle) in cases.items():
        folder = _write_vocab(str(tmp_path / name.replace(" ", "_").replace(".", "_")), vt, mt)
        with pytest.raises(UserError, match=needle) as e:
            tokenizer.load_tokenizer(folder)
        assert "\n" not in str(e.value) and folder in str(e.value), (name, str(e.value))
    # Windows line ends are read as transformers reads them
    crlf = tokenizer.load_tokenizer(_write_vocab(str(tmp_path / "crlf"), vocab_text, merges_text.replace("\n", "\r\n")))
    assert torch.equal(crlf(CAPTIONS), tok(CAPTIONS))


# -----------------------------------------------------------------------------
# the sharded checkpoint (DCP), in one process of a gloo group

_DCP = """
    import os, resource, signal, sys
    import torch, torch.distributed as dist
    import configurator, sharding
    configurator.configure({}, argv=[], exit_on_error=True)  # the entry scripts' way: a UserError is one line, exit 2
    folder, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    tensors = {"w": torch.arange(300_000, dtype=torch.float32), "b": torch.ones(7)}
    if mode in ("save", "full"):
        sharding.save_sharded(folder, tensors, {"iter_num": 1}, True)
    if mode == "full":  # a second checkpoint on a disk too small for it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        sharding.save_sharded(folder, {"w": tensors["w"] + 1, "b": tensors["b"]}, {"iter_num": 2}, True)
    else:
        try:  # as train.py's resume does
            sharding.load_sharded(folder, {"w": torch.zeros(300_000), "b": torch.zeros(7)})
        except (Exception, sharding.dcp.api.CheckpointException) as e:
            raise configurator.UserError(f"cannot resume from {folder}: damaged ({type(e).__name__})") from None
"""


def test_full_disk_under_sharded_save_is_one_line(tmp_path):
    folder = str(tmp_path / "ckpt")
    r = python(_DCP, folder, "full")
    one_line(r, "no space left writing", "ckpt/", "GiB", "untouched")
    assert os.listdir(tmp_path) == ["ckpt"], os.listdir(tmp_path)  # no ckpt.new left
    r = python(_DCP, folder, "load")  # the first checkpoint is whole
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr[-2000:]


def test_damaged_dcp_index_is_one_line(tmp_path):
    folder = str(tmp_path / "ckpt")
    assert python(_DCP, folder, "save").returncode == 0
    meta = os.path.join(folder, ".metadata")
    with open(meta, "rb") as f:
        whole = f.read()
    for damaged in (whole[:len(whole) // 2], b"\x00not a pickle"):
        with open(meta, "wb") as f:
            f.write(damaged)
        one_line(python(_DCP, folder, "load"), "cannot resume from", "damaged")


# -----------------------------------------------------------------------------
# temp files a dead process left

def test_remove_temps_takes_only_our_temp_files(tmp_path):
    run = tmp_path / "run"
    (run / "diffusers" / "unet").mkdir(parents=True)
    (run / "cache" / "ab").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    left = files.atomic_path(str(run / "model.safetensors"))  # a write whose process died inside the block
    dead = left.__enter__()
    ours = [dead, str(run / "diffusers" / "unet" / ".config.json.k2_9xq0z.tmp")]
    theirs = [run / "notes.tmp", run / ".hidden.tmp", run / ".x.ABCDEFGH.tmp", run / ".x.abcdefg.tmp",
              run / "x.abcdefgh.tmp", run / "cache" / "ab" / ".e.safetensors.abcdefgh.tmp",
              tmp_path / "elsewhere" / ".y.abcdefgh.tmp"]
    for p in ours[1:] + theirs:
        open(p, "w").close()
    os.symlink(tmp_path / "elsewhere" / ".y.abcdefgh.tmp", run / ".link.abcdefgh.tmp")  # a symlink stays
    os.symlink(tmp_path / "elsewhere", run / "linked")  # a symlinked folder is not entered
    removed = files.remove_temps(str(run), keep=[str(run / "cache")])
    assert sorted(removed) == sorted(ours) and not any(os.path.exists(p) for p in ours)
    assert all(os.path.exists(p) for p in theirs) and os.path.islink(run / ".link.abcdefgh.tmp")
    assert files.remove_temps(str(run)) == [str(run / "cache" / "ab" / ".e.safetensors.abcdefgh.tmp")]


# -----------------------------------------------------------------------------
# sample_ablation.py

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random checkpoint with train.py's export layout for the tokenizer, and one whose text encoders
    embed fewer ids than that vocabulary has."""
    d = tmp_path_factory.mktemp("tiny_sa")
    path = str(d / "model.safetensors")
    checkpoint.save_checkpoint(model.init_random_(model.SDXL(model.SDXLConfig.tiny()), seed=0), path, v_pred=True,
                          ztsnr=True)
    demo.build_tiny_vocab(str(d / "diffusers" / "tokenizer"), CAPTIONS)
    (d / "small").mkdir()
    small = str(d / "small" / "model.safetensors")
    checkpoint.save_checkpoint(model.init_random_(model.SDXL(model.SDXLConfig.tiny(vocab_size=300)), seed=0), small,
                          v_pred=True, ztsnr=True)
    return path, small, str(d / "diffusers" / "tokenizer")


def sample_ablation(*args, **kw):
    return subprocess.run([sys.executable, "sample_ablation.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kw)


FAST = ["--steps=1", "--height=64", "--prompts=a cat", "--panels=[(0.024, True, 'v')]", "--quant_n=2"]


def test_sample_ablation_checks_before_sampling_and_never_clobbers(tiny_ckpt, tmp_path):
    ckpt, small, vocab_dir = tiny_ckpt
    sa = lambda *a: sample_ablation(f"--ckpt={ckpt}", *FAST, *a)
    # a run folder: its run.json is never replaced, --overwrite or not
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text('{"iter": 7}')
    for extra in ([], ["--overwrite=True"]):
        one_line(sa(f"--out={run_dir}/run.png", *extra), "did not write", "run.json")
    assert snapshot(run_dir) == {"run.json": b'{"iter": 7}'}
    # files of its own: replaced only when asked
    (tmp_path / "g.png").write_bytes(b"an older grid")
    one_line(sa(f"--out={tmp_path}/g.png"), "exist already", "--overwrite=True")
    assert (tmp_path / "g.png").read_bytes() == b"an older grid"
    one_line(sa(f"--out={tmp_path}/g.json"), "must name a .png")
    # what the files show, before a single image is sampled
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "a.txt").write_text("a caption without its image")
    r = sa(f"--out={tmp_path}/h.png", f"--dataset_dir={tmp_path}/no_images")
    one_line(r, "no usable images")
    assert "panel 1/1" not in r.stdout and not (tmp_path / "h.png").exists()
    one_line(sample_ablation(f"--ckpt={small}", f"--tokenizer={vocab_dir}", *FAST, f"--out={tmp_path}/h.png"),
             "tokens, but the text encoders", "embed 300")
    for seeds in ("[18446744073709551616]", "[-1]"):
        one_line(sa(f"--out={tmp_path}/h.png", f"--seeds={seeds}"), "seeds")
    one_line(sa(f"--out={tmp_path}/h.png", "--quant_seed=18446744073709551616"), "--quant_seed")
    assert not (tmp_path / "h.png").exists()


def test_sample_ablation_stops_cleanly_on_sigterm(tiny_ckpt, tmp_path):
    ckpt, _, _ = tiny_ckpt
    (tmp_path / "tmp").mkdir()
    p = subprocess.Popen([sys.executable, "-u", "sample_ablation.py", f"--ckpt={ckpt}", *FAST, "--quant_n=8",
                          "--batch_size=1", f"--out={tmp_path}/g.png"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    for line in p.stdout:
        if line.startswith("wrote "):  # the grid is written; the error table starts
            p.send_signal(signal.SIGTERM)
            break
    out, err = p.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert p.returncode == 128 + signal.SIGTERM and len(lines) == 1 and "Traceback" not in out + err, out + err
    left = [name for name in os.listdir(tmp_path / "tmp") if name.startswith("quant_shapes_")]
    assert not left, "the synthetic held-out images were left behind"
    assert sorted(os.listdir(tmp_path)) == ["g.png", "tmp"]  # the grid, whole; no temp file, no JSON


# -----------------------------------------------------------------------------
# configurator

def test_home_is_expanded_in_string_values(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    g = {"__file__": "x.py", "out_dir": "out", "prompts": "", "tag": "", "betas": (0.9, 0.95), "n": 1}
    cfg = tmp_path / "c.py"
    cfg.write_text("prompts = '~/prompts.txt'\n")
    configurator.configure(g, ["--out_dir=~/runs/a", str(cfg), "--tag=~"])
    assert g["out_dir"] == f"{tmp_path}/runs/a" and g["prompts"] == f"{tmp_path}/prompts.txt" and g["tag"] == str(tmp_path)
    for kept in ("a~/b", "~user_is_not_expanded", "~~/x", "hf:a/~/b"):
        configurator.configure(g, [f"--tag={kept}"])
        assert g["tag"] == kept
    # a config file named with '~/' too
    configurator.configure(g, ["~/c.py"])
    assert g["prompts"] == f"{tmp_path}/prompts.txt"


def test_config_files_are_read_as_python_reads_them(tmp_path):
    g = {"__file__": "x.py", "lr": 1e-5, "note": ""}
    bad = tmp_path / "latin1.py"
    bad.write_bytes(b"lr = 2e-5\nnote = 'caf\xe9'\n")
    with pytest.raises(ValueError) as e:
        configurator.configure(g, [str(bad)])
    msg = str(e.value)
    assert str(bad) in msg and "line 2" in msg and "not UTF-8" in msg and "codec" not in msg and "\n" not in msg
    (tmp_path / "comment.py").write_bytes(b"lr = 2e-5\n\n# caf\xe9\n")  # python refuses to run it too
    with pytest.raises(ValueError, match="comment.py line 3: not UTF-8"):
        configurator.configure(g, [str(tmp_path / "comment.py")])
    # a UTF-8 BOM (Windows editors) and a coding line are Python's rules, so they hold here too
    (tmp_path / "bom.py").write_bytes(b"\xef\xbb\xbfnote = 'caf\xc3\xa9'\n")
    configurator.configure(g, [str(tmp_path / "bom.py")])
    assert g["note"] == "caf\u00e9"
    (tmp_path / "coded.py").write_bytes(b"# -*- coding: latin-1 -*-\nnote = 'th\xe9'\n")
    configurator.configure(g, [str(tmp_path / "coded.py")])
    assert g["note"] == "th\u00e9"
    # from the command line: one line naming the file
    r = subprocess.run([sys.executable, "sample_ablation.py", str(bad)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    one_line(r, "latin1.py line 2", "not UTF-8")


_SIGNALLED = """
    import sys, time
    import configurator, files
    configurator.on_stop_signals()
    with files.atomic_path(sys.argv[1]) as tmp:
        open(tmp, "w").write("half")
        print("writing", flush=True)
        time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_stop_signals_end_like_sigterm(tmp_path, sig):
    # SIGHUP at its default in the child, as in a terminal: under a nohup'd test run it would be inherited as
    # ignored, which on_stop_signals respects (the next test)
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_SIGNALLED), str(tmp_path / "f.json")], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    assert p.stdout.readline() == "writing\n"
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig and err.strip() == f"stopped by {signal.Signals(sig).name}", (p.returncode, err)
    assert os.listdir(tmp_path) == [], "the temp file was left behind"


def test_nohup_keeps_sighup_ignored():
    r = python("""
        import signal, configurator
        configurator.on_stop_signals()
        print(signal.getsignal(signal.SIGHUP) == signal.SIG_IGN, signal.getsignal(signal.SIGTERM) != signal.SIG_DFL)
    """, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert r.stdout.split() == ["True", "True"], r.stdout + r.stderr
