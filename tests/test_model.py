"""
Tests for model.py: CPU, fp32, every parameter random, tiny configs.

    .venv/bin/python -m pytest tests/test_model.py -q -s      # -s prints the max relative error per component
    RUN_SLOW=1 .venv/bin/python -m pytest tests/test_model.py  # + the Inductor compile (about 2 min on 2 cores)

Parity (the litgpt recipe): build the diffusers / transformers oracle from a tiny config, map its weights to the
sgm layout with tests/sgm_oracle.py (itself checked against diffusers' own converters), write a real safetensors
file, load it with the production checkpoint.load_checkpoint, compare outputs.
"""
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import checkpoint  # noqa: E402
import export  # noqa: E402
import model  # noqa: E402
import sgm_oracle  # noqa: E402
from model import SDXLConfig, TextConfig, UNetConfig, VAEConfig  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

TOL = 1e-4
# the release file's 2515 keys, shapes and dtypes: a copy of shared/sdxl/sdxl_base_keys.tsv, so a fresh clone checks them
GOLDEN = ROOT / "tests" / "sdxl_base_keys.tsv"


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def sdxl_config(te1, te2, vae, **unet):
    """A consistent SDXLConfig: the UNet's context and y widths follow the text encoders."""
    u = UNetConfig(context_dim=te1.width + te2.width, adm_in_channels=te2.proj_dim + 6 * model.TIME_ID_DIM, **unet)
    return SDXLConfig(unet=u, vae=vae, te1=te1, te2=te2)


# name -> (config, UNet latent (h, w), VAE image (H, W)); heads = width // 64 everywhere
CONFIGS = {
    "tiny": (SDXLConfig.tiny(), (8, 12), (27, 41)),
    # 1/2/3 heads, attention at every level, 1 ResBlock per level, non-square text_projection (192 -> 64)
    "heads": (sdxl_config(TextConfig(vocab_size=300, width=128, layers=3, mlp_dim=256),
                          TextConfig(vocab_size=300, width=192, layers=3, mlp_dim=384, act="gelu", proj_dim=64),
                          VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1),
                          model_channels=64, channel_mult=(1, 2, 3), num_res_blocks=1, transformer_depth=(1, 2, 2),
                          transformer_depth_middle=2), (12, 8), (20, 13)),
    # two levels, 3 ResBlocks per level, pooled width > te2 width, wider VAE
    "two_level": (sdxl_config(TextConfig(vocab_size=500, width=64, layers=2, mlp_dim=128),
                              TextConfig(vocab_size=500, width=128, layers=2, mlp_dim=256, act="gelu", proj_dim=256),
                              VAEConfig(ch=64, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
                              model_channels=64, channel_mult=(1, 2), num_res_blocks=3, transformer_depth=(0, 1),
                              transformer_depth_middle=1), (6, 10), (16, 24)),
}
RESULTS = {}  # (config, component) -> max relative error, printed at the end


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if RESULTS:
        print("\nmax relative error vs diffusers/transformers oracles (fp32, CPU):")
        for (name, comp), err in sorted(RESULTS.items()):
            print(f"  {name:10s} {comp:16s} {err:.2e}")


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    """Oracles for one config, their sgm state dict written to a real file, and that file loaded by model.py."""
    name = request.param
    cfg, latent_hw, image_hw = CONFIGS[name]
    oracles = sgm_oracle.build_oracles(cfg, seed=list(CONFIGS).index(name))
    sd = sgm_oracle.sgm_state_dict(oracles, cfg)
    path = tmp_path_factory.mktemp(name) / "sgm.safetensors"
    save_file(sd, str(path))
    return dict(name=name, cfg=cfg, oracles=oracles, sd=sd, path=path, sdxl=checkpoint.load_checkpoint(path),
                latent_hw=latent_hw, image_hw=image_hw)


def tokens(vocab, n_ctx, lengths, pad):
    """BOS, random ids, EOS, pads: BOS = vocab-2, EOS = vocab-1 (the largest id, as in CLIP)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab - 2, (len(lengths), n_ctx), generator=g)
    ids[:, 0] = vocab - 2
    for i, n in enumerate(lengths):
        ids[i, n] = vocab - 1
        ids[i, n + 1:] = pad
    return ids

# -----------------------------------------------------------------------------
# parity with the oracles, through the production loader

def test_reverse_mapping_matches_diffusers_converters(case):
    sgm_oracle.check_roundtrip(case["sd"], case["oracles"], case["cfg"])


def test_config_inferred_from_shapes(case):
    assert case["sdxl"].cfg == case["cfg"]
    assert not case["sdxl"].v_pred and not case["sdxl"].ztsnr


@torch.no_grad()
def test_unet_parity(case):
    cfg, sdxl, ref = case["cfg"], case["sdxl"], case["oracles"]["unet"]
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([0, 1, 421, 999])
    B, (h, w) = len(t), case["latent_hw"]
    x = torch.randn(B, 4, h, w, generator=g)
    context = torch.randn(B, 77, cfg.unet.context_dim, generator=g)
    pooled = torch.randn(B, cfg.te2.proj_dim, generator=g)
    time_ids = torch.tensor([[1024.0, 768, 0, 16, 896, 1152]]).repeat(B, 1) + torch.arange(B)[:, None]
    ours = sdxl.unet(x, t, context, model.build_y(pooled, time_ids))
    theirs = ref(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert ours.shape == (B, 4, h, w)
    RESULTS[case["name"], "unet"] = err = rel_err(ours, theirs)
    assert err < TOL


@torch.no_grad()
def test_unet_parity_long_context(case):
    """Cross-attention over any context length: 231 positions (max_token_length 225, 3 x 77) against diffusers."""
    cfg, sdxl, ref = case["cfg"], case["sdxl"], case["oracles"]["unet"]
    g = torch.Generator().manual_seed(5)
    t = torch.tensor([17, 999])
    B, (h, w) = len(t), case["latent_hw"]
    x = torch.randn(B, 4, h, w, generator=g)
    context = torch.randn(B, 3 * 77, cfg.unet.context_dim, generator=g)
    pooled = torch.randn(B, cfg.te2.proj_dim, generator=g)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]).repeat(B, 1)
    ours = sdxl.unet(x, t, context, model.build_y(pooled, time_ids))
    theirs = ref(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    RESULTS[case["name"], "unet ctx 231"] = err = rel_err(ours, theirs)
    assert err < TOL
    # the extra positions are read: the output moves when only the last chunk changes
    context[:, 154:] += 1.0
    assert rel_err(sdxl.unet(x, t, context, model.build_y(pooled, time_ids)), ours) > 1e-3


@torch.no_grad()
def test_vae_parity(case):
    vae, ref = case["sdxl"].vae, case["oracles"]["vae"]
    g = torch.Generator().manual_seed(3)
    img = torch.rand(2, 3, *case["image_hw"], generator=g) * 2 - 1  # odd sizes: asymmetric-pad downsampling
    mean, logvar = vae.encode(img)
    dist = ref.encode(img).latent_dist
    RESULTS[case["name"], "vae.encode mean"] = e1 = rel_err(mean, dist.mean)
    RESULTS[case["name"], "vae.encode logvar"] = e2 = rel_err(logvar, dist.logvar)
    z = torch.randn(2, 4, 5, 7, generator=g)
    RESULTS[case["name"], "vae.decode"] = e3 = rel_err(vae.decode(z), ref.decode(z).sample)
    assert max(e1, e2, e3) < TOL


@torch.no_grad()
def test_text_encoder_parity(case):
    cfg, sdxl, oracles = case["cfg"], case["sdxl"], case["oracles"]
    lengths = [5, 40, cfg.te1.n_ctx - 1]
    t1 = tokens(cfg.te1.vocab_size, cfg.te1.n_ctx, lengths, pad=cfg.te1.vocab_size - 1)  # CLIP-L pads with EOS
    t2 = tokens(cfg.te2.vocab_size, cfg.te2.n_ctx, lengths, pad=0)                       # bigG pads with 0
    h1 = sdxl.te1(t1)
    hs1 = oracles["te1"](t1, output_hidden_states=True).hidden_states
    RESULTS[case["name"], "te1 penultimate"] = e1 = rel_err(h1, hs1[-2])
    assert rel_err(h1, hs1[-1]) > 0.01 and rel_err(h1, hs1[-3]) > 0.01  # really the penultimate layer
    h2, pooled = sdxl.te2(t2)
    ref = oracles["te2"](t2, output_hidden_states=True)
    RESULTS[case["name"], "te2 penultimate"] = e2 = rel_err(h2, ref.hidden_states[-2])
    assert rel_err(h2, ref.hidden_states[-1]) > 0.01
    RESULTS[case["name"], "te2 pooled"] = e3 = rel_err(pooled, ref.text_embeds)
    assert max(e1, e2, e3) < TOL
    context, pooled2 = sdxl.encode_text(t1, t2)
    assert context.shape == (3, 77, cfg.unet.context_dim) and torch.equal(context, torch.cat([h1, h2], -1))
    assert torch.equal(pooled2, pooled)
    if cfg.te2.proj_dim == cfg.te2.width:  # negative control: x @ W.T (the diffusers orientation) must differ
        W = sdxl.te2.text_projection
        try:
            W.data = W.data.T.contiguous()
            RESULTS[case["name"], "te2 pooled W.T"] = bad = rel_err(sdxl.te2(t2)[1], ref.text_embeds)
        finally:
            W.data = W.data.T.contiguous()
        assert bad > 0.1

def _chunk_texts(tok, caption, n):
    """A caption cut by hand into n texts of at most 75 tokens at spaces (a word that does not fit starts the next
    text; every word here is shorter than 8 tokens); the last text takes all the rest, which the 77-token path
    truncates, and texts past the caption are empty."""
    texts, words, used = [], [], 0
    for w in caption.split(" ") if caption else []:
        k = len(tok.encode(w))
        assert 0 < k < 8
        if used + k > 75 and len(texts) < n - 1:
            texts.append(" ".join(words))
            words, used = [], 0
        words.append(w)
        used += k
    texts.append(" ".join(words))
    return texts + [""] * (n - len(texts))


@torch.no_grad()
def test_long_prompts_encode_each_chunk_alone(tmp_path):
    """max_token_length 150 / 225 through the real text encoders (cache.encode_captions, which the cache and
    sample_ablation.encode_prompts use) against an independent computation: each caption cut into texts by hand,
    each text through the single-row 77-token path, the contexts side by side and pooled from the first. A caption
    of at most 75 tokens keeps its single-row encoding as the first chunk."""
    import cache
    import demo
    import tokenizer
    words = ["a", "large", "red", "circle", "on", "blue", "background", "small", "green", "square", "top", "left"]
    captions = ["", "a red circle on a blue background", ", ".join(words * 3), " ".join(words * 10)]
    tok = tokenizer.load_tokenizer(demo.build_tiny_vocab(str(tmp_path / "tok"), captions, n_merges=24))
    lengths = [len(tok.encode(c)) for c in captions]
    assert lengths[1] <= 75 < lengths[2] <= 150 < 225 < lengths[3]
    sdxl = model.init_random_(model.SDXL(SDXLConfig.tiny(vocab_size=tok.vocab_size)), seed=3)
    one = lambda texts: cache.encode_captions(sdxl.encode_text, *tokenizer.tokenize(tok, texts))  # 77 positions
    single, single_pooled = one(captions)
    assert single.shape == (4, 77, 192)
    texts = _chunk_texts(tok, captions[3], 3)
    assert all(texts) and len(tok.encode(texts[0])) < 75  # a word went whole to the next chunk
    assert _chunk_texts(tok, captions[1], 3)[1:] == ["", ""]
    for n in (2, 3):
        tokens = tokenizer.tokenize(tok, captions, max_token_length=75 * n)
        context, pooled = cache.encode_captions(sdxl.encode_text, *tokens)
        assert context.shape == (4, 77 * n, 192) and pooled.shape == (4, 128)
        for b, caption in enumerate(captions):
            texts = _chunk_texts(tok, caption, n)
            parts = [one([t]) for t in texts]  # one text at a time
            # bit-equal on this CPU; the tolerance is for BLAS libraries whose matmuls round differently at
            # another batch size
            torch.testing.assert_close(context[b:b + 1], torch.cat([h for h, _ in parts], dim=1), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(pooled[b:b + 1], parts[0][1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(context[:2, :77], single[:2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pooled[:2], single_pooled[:2], rtol=1e-5, atol=1e-6)
        assert rel_err(context[3, 77:154], context[0, 77:154]) > 0.01  # a long caption's later chunks hold text


# -----------------------------------------------------------------------------
# full size, on the meta device

def test_full_size_matches_golden_keys():
    golden = {}
    for line in GOLDEN.read_text().splitlines():
        key, shape, _ = line.split("\t")
        golden[key] = tuple(int(s) for s in shape.split("x")) if shape else ()
    assert len(golden) == 2515
    with torch.device("meta"):
        sdxl = model.SDXL()
    state = sdxl.state_dict()
    assert all(t.is_meta for t in state.values())
    ours = {k: tuple(t.shape) for k, t in state.items()}
    ours[model.PREFIX["te1"] + "embeddings.position_ids"] = (1, 77)  # int64, written by save, not a module state
    assert ours == golden
    assert sum(p.numel() for p in sdxl.unet.parameters()) == 2_567_463_684
    assert sum(t.numel() for t in state.values()) == 3_468_837_868
    assert checkpoint.config_from_shapes(golden) == SDXLConfig()

# -----------------------------------------------------------------------------
# save / load

@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    cfg = SDXLConfig.tiny(vocab_size=64)
    return {k: v.contiguous() for k, v in model.init_random_(model.SDXL(cfg)).state_dict().items()}


def _write(tmp_path, tensors, name="bad.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_save_load_roundtrip(tiny_sd, tmp_path_factory, monkeypatch):
    src = {**tiny_sd, model.PREFIX["te1"] + "embeddings.position_ids": torch.arange(77)[None]}  # as in the release
    sdxl = checkpoint.load_checkpoint(_write(tmp_path_factory.mktemp("src"), src))
    tmp_path = tmp_path_factory.mktemp("out")
    out = tmp_path / "model.safetensors"
    extra = {"ss_noise_schedule": {"beta_end": 0.024, "zsnr": True, "spacing": "trailing"}, "note": "hello"}
    checkpoint.save_checkpoint(sdxl, out, v_pred=True, ztsnr=True, metadata=extra)
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temp file left behind
    saved = load_file(str(out))
    assert saved.keys() == src.keys() | {"v_pred", "ztsnr"}
    assert saved["v_pred"].shape == saved["ztsnr"].shape == (0,)
    assert all(torch.equal(saved[k], src[k]) and saved[k].dtype == src[k].dtype for k in src)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.implementation"] == "sgm" and meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.title"] == "model" and meta["modelspec.date"][:2] == "20"
    assert json.loads(meta["ss_noise_schedule"]) == extra["ss_noise_schedule"] and meta["note"] == "hello"
    again = checkpoint.load_checkpoint(out)
    assert again.v_pred and again.ztsnr and again.metadata["note"] == "hello"
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), sdxl.state_dict().values()))
    # load -> save -> load is lossless, byte for byte in the tensors
    out2 = tmp_path / "again.safetensors"
    checkpoint.save_checkpoint(again, out2, v_pred=False, ztsnr=False)
    saved2 = load_file(str(out2))
    assert saved2.keys() == src.keys() and all(torch.equal(saved2[k], src[k]) for k in src)
    with safe_open(str(out2), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "epsilon"
    # export dtype
    out16 = tmp_path / "fp16.safetensors"
    checkpoint.save_checkpoint(sdxl, out16, dtype=torch.float16)
    s16 = load_file(str(out16))
    assert s16[model.PREFIX["te1"] + "embeddings.position_ids"].dtype == torch.int64
    assert all(v.dtype == torch.float16 for k, v in s16.items() if k in src and "position_ids" not in k)
    back = checkpoint.load_checkpoint(out16, dtype=torch.bfloat16)
    assert next(back.unet.parameters()).dtype == torch.bfloat16
    # a torch.compile wrapper in the tree (or around the whole model) does not leak `_orig_mod.` into the file
    sdxl.model.diffusion_model = torch.compile(sdxl.unet)
    try:
        outc = tmp_path / "compiled.safetensors"
        checkpoint.save_checkpoint(torch.compile(sdxl), outc)
        assert load_file(str(outc)).keys() == saved.keys()
    finally:
        sdxl.model.diffusion_model = sdxl.unet._orig_mod
    # atomic: a write that fails half way (disk full after the header) leaves the old file intact, no temp file

    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(model.torch.Tensor, "numpy", lambda self: boom())
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(sdxl, out)
    assert load_file(str(out)).keys() == saved.keys()
    assert sorted(os.listdir(tmp_path)) == sorted(["model.safetensors", "again.safetensors", "fp16.safetensors",
                                                   "compiled.safetensors"])

# -----------------------------------------------------------------------------
# bad input: one clear CheckpointError (a ValueError) each

def test_bad_files(tiny_sd, tmp_path):
    good = _write(tmp_path, tiny_sd, "good.safetensors")
    data = good.read_bytes()
    for name, content in [("truncated.safetensors", data[: len(data) // 2]), ("text.safetensors", b"hello " * 50),
                          ("empty.safetensors", b"")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(checkpoint.CheckpointError, match="not a readable safetensors file"):
            checkpoint.load_checkpoint(tmp_path / name)
    torch.save({"state_dict": {}}, tmp_path / "old.ckpt")
    with pytest.raises(checkpoint.CheckpointError, match="pickle"):
        checkpoint.load_checkpoint(tmp_path / "old.ckpt")
    with pytest.raises(FileNotFoundError):
        checkpoint.load_checkpoint(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("kind, expect", [
    ("sd15", "SD1.x/SD2.x"), ("refiner", "SDXL refiner"), ("unet_only", "UNet-only"), ("diffusers", "diffusers")])
def test_other_architectures(tiny_sd, tmp_path, kind, expect):
    unet = {k: v for k, v in tiny_sd.items() if k.startswith(model.PREFIX["unet"])}
    vae = {k: v for k, v in tiny_sd.items() if k.startswith(model.PREFIX["vae"])}
    te2 = {k.replace("embedders.1", "embedders.0"): v for k, v in tiny_sd.items() if k.startswith(model.PREFIX["te2"])}
    files = {"sd15": {**unet, **vae, "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(4)},
             "refiner": {**unet, **vae, **te2}, "unet_only": unet,
             "diffusers": {"conv_in.weight": torch.ones(4, 4, 3, 3),
                           "down_blocks.0.resnets.0.norm1.weight": torch.ones(4)}}
    with pytest.raises(checkpoint.CheckpointError, match=expect) as e:
        checkpoint.load_checkpoint(_write(tmp_path, files[kind]))
    assert "not an SDXL base checkpoint" in str(e.value)


def test_missing_unexpected_misshaped_keys(tiny_sd, tmp_path):
    P = model.PREFIX
    gone = [P["unet"] + "output_blocks.3.0.out_layers.0.bias", P["te2"] + "ln_final.weight"]
    sd = {k: v for k, v in tiny_sd.items() if k not in gone}
    sd[P["unet"] + "foo.weight"] = torch.ones(2)
    sd[P["vae"] + "decoder.conv_out.bias"] = torch.ones(5)  # 3 channels expected
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_checkpoint(_write(tmp_path, sd))
    msg = str(e.value)
    assert "missing 2 (" in msg and all(k in msg for k in gone)
    assert "unexpected 1 (" + P["unet"] + "foo.weight" in msg
    assert P["vae"] + "decoder.conv_out.bias (5,) vs (3,)" in msg
    # a key that the size inference itself needs
    sd = {k: v for k, v in tiny_sd.items() if k != P["unet"] + "label_emb.0.0.weight"}
    with pytest.raises(checkpoint.CheckpointError, match="label_emb.0.0.weight"):
        checkpoint.load_checkpoint(_write(tmp_path, sd, "b.safetensors"))
    # the unused `position_ids` may be absent, the markers are accepted
    sd = {**tiny_sd, "v_pred": torch.zeros(0)}
    assert checkpoint.load_checkpoint(_write(tmp_path, sd, "c.safetensors")).v_pred


def test_pruned_clip_l_is_refused():
    shapes = {}
    for line in GOLDEN.read_text().splitlines():
        key, shape, _ = line.split("\t")
        if ".encoder.layers.11." not in key:
            shapes[key] = tuple(int(s) for s in shape.split("x")) if shape else ()
    with pytest.raises(checkpoint.CheckpointError, match="11 layers"):
        checkpoint.config_from_shapes(shapes)

# -----------------------------------------------------------------------------
# misc model behaviour

def test_init_random_touches_every_tensor():
    sdxl = model.init_random_(model.SDXL(SDXLConfig.tiny(vocab_size=64)), seed=0)
    for k, t in sdxl.state_dict().items():
        assert t.isfinite().all() and (t != 0).all(), k
        assert t.numel() == 1 or t.std() > 1e-3, k  # not a constant (zeros, ones)
    again = model.init_random_(model.SDXL(SDXLConfig.tiny(vocab_size=64)), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(sdxl.state_dict().values(), again.state_dict().values()))


def test_timestep_embedding_cos_first():
    e = model.timestep_embedding(torch.tensor([0, 7]), 8)
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    assert torch.allclose(e[1], torch.cat([torch.cos(7 * freqs), torch.sin(7 * freqs)]))


def _small_unet():
    cfg = SDXLConfig.tiny()
    cfg.unet = replace(cfg.unet, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1))
    unet = model.init_random_(model.UNet(cfg.unet), seed=0)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 999]), torch.randn(2, 77, 192, generator=g),
            torch.randn(2, cfg.unet.adm_in_channels, generator=g))
    return unet, args


def test_grad_checkpointing_is_exact():
    unet, args = _small_unet()
    grads = []
    for ckpt in (False, True):
        unet.grad_ckpt = ckpt
        unet.zero_grad()
        out = unet(*args)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in unet.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads[0][1], grads[1][1]))


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.skipif(
    not os.environ.get("RUN_SLOW"), reason="Inductor on CPU takes ~2 min; RUN_SLOW=1 runs it"))])
@torch.no_grad()
def test_unet_compiles_fullgraph(backend):
    # fullgraph=True makes Dynamo raise on any graph break; the eager backend checks exactly that, cheaply
    torch._dynamo.reset()
    unet, args = _small_unet()
    out = torch.compile(unet, fullgraph=True, backend=backend)(*args)
    assert rel_err(out, unet(*args)) < 1e-5

# -----------------------------------------------------------------------------
# diffusers' from_single_file with the config folder written by export.write_diffusers_config

def _byte_vocab(folder):
    """A CLIP-style vocabulary without merges: 256 byte characters, the same with `</w>`, and the two specials."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in bs] + [chr(256 + n) for n in range(256 - len(bs))]
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


@torch.no_grad()
def test_diffusers_from_single_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionXLPipeline
    vocab = _byte_vocab(tmp_path / "tok")
    cfg = SDXLConfig.tiny(vocab_size=vocab)
    sdxl = model.init_random_(model.SDXL(cfg), seed=5)
    checkpoint.save_checkpoint(sdxl, tmp_path / "m.safetensors", v_pred=True, ztsnr=True)
    export.write_diffusers_config(cfg, tmp_path / "diffusers", beta_end=0.024, zsnr=True, prediction="v",
                                 tokenizer_dirs=(tmp_path / "tok", tmp_path / "tok"))
    pipe = StableDiffusionXLPipeline.from_single_file(str(tmp_path / "m.safetensors"),
                                                      config=str(tmp_path / "diffusers"), local_files_only=True)
    sc = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and sc.prediction_type == "v_prediction"
    assert (sc.beta_start, sc.beta_end, sc.beta_schedule) == (0.00085, 0.024, "scaled_linear")
    assert sc.rescale_betas_zero_snr and sc.timestep_spacing == "trailing"
    assert pipe.vae.config.scaling_factor == model.VAE_SCALE
    assert pipe.tokenizer.pad_token_id == vocab - 1 and pipe.tokenizer_2.pad_token_id == 0
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, 0] == vocab - 2 and ids.shape == (1, 77)
    # the same weights in both: UNet, text encoders
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 8, 12, generator=g), torch.tensor([17, 999])
    context, pooled = torch.randn(2, 77, 192, generator=g), torch.randn(2, 128, generator=g)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)
    ours = sdxl.unet(x, t, context, model.build_y(pooled, time_ids))
    theirs = pipe.unet(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    RESULTS["from_single_file", "unet"] = err = rel_err(ours, theirs)
    assert err < TOL
    t2 = pipe.tokenizer_2(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    h2, p2 = sdxl.te2(t2)
    ref = pipe.text_encoder_2(t2, output_hidden_states=True)
    assert rel_err(h2, ref.hidden_states[-2]) < TOL and rel_err(p2, ref.text_embeds) < TOL
    assert rel_err(sdxl.te1(ids), pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]) < TOL
