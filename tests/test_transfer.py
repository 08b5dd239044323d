"""transfer.py on the tiny model (fp32): the full delta reproduces the uptrain exactly, a full-rank LoRA reproduces the
delta, diffusers' own kohya-LoRA loader gives the same UNet weights as our apply, the result is detected as v-pred,
and bad input is one line before any tensor is read."""
import copy
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import checkpoint
import demo
import export
import model
import transfer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET = checkpoint.PREFIX["unet"]
RECIPE = {"prediction": "v", "beta_start": 0.00085, "beta_end": 0.024, "zsnr": True, "weighting": "sigmoid", "k": 5.0,
          "optimizer": "adamw8bit", "lr": 3e-4, "max_iters": 40, "batch_size": 4, "global_batch": 4,
          "base": "data/tiny/start.safetensors"}


def run(*args, check=True):
    r = subprocess.run([sys.executable, "transfer.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if check and r.returncode != 0:
        raise AssertionError(f"transfer.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def perturbed(sdxl, seed, scale=0.05):
    """A copy whose UNet moved by about `scale` of each tensor's spread: a stand-in for a short training run."""
    sdxl = copy.deepcopy(sdxl)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sdxl.unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp_min(1e-3))
    return sdxl


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """eps.safetensors (tiny random), vpred/ (its 'uptrain', exported as train.py exports), base2.safetensors (another
    eps fine-tune of the same start), a tokenizer; and the LoRAs extracted at full rank, norms kept and left out."""
    d = tmp_path_factory.mktemp("transfer")
    eps = model.init_random_(model.SDXL(model.SDXLConfig.tiny()), seed=0)
    checkpoint.save_checkpoint(eps, d / "eps.safetensors", v_pred=False, ztsnr=False)
    demo.build_tiny_vocab(d / "tok", ["a red circle on a blue background"], n_merges=16)
    export.write_export(d / "vpred", perturbed(eps, 1), RECIPE, dtype=torch.float32, tokenizer_dirs=(d / "tok",) * 2)
    checkpoint.save_checkpoint(perturbed(eps, 2), d / "base2.safetensors", v_pred=False, ztsnr=False)
    for norms in ("diff", "none"):
        run("--mode=extract", f"--eps={d}/eps.safetensors", f"--vpred={d}/vpred/model.safetensors", "--rank=100000",
            f"--out={d}/lora_{norms}.safetensors", "--dtype=fp32", f"--norms={norms}")
    return d


def unet_out(state):
    """The tiny UNet's output on fixed inputs, for a state dict in the sgm layout."""
    sdxl = model.SDXL(model.SDXLConfig.tiny())
    keys = sdxl.state_dict().keys()
    sdxl.load_state_dict({k: v for k, v in state.items() if k in keys})
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 16, 12, generator=g), torch.tensor([999, 300])
    ctx, y = torch.randn(2, 77, 192, generator=g), torch.randn(2, sdxl.cfg.unet.adm_in_channels, generator=g)
    with torch.no_grad():
        return sdxl.unet(x, t, ctx, y)


def test_full_delta_then_apply_is_the_uptrain_exactly(pair):
    d = pair
    r = run("--mode=extract", f"--eps={d}/eps.safetensors", f"--vpred={d}/vpred/model.safetensors",
            f"--out={d}/delta.safetensors")
    assert "100.00% of the delta's sum of squares kept" in r.stdout
    eps, vpred = load_file(d / "eps.safetensors"), load_file(d / "vpred/model.safetensors")
    delta = load_file(d / "delta.safetensors")
    unet = [k for k in vpred if k.startswith(UNET)]
    assert len(delta) == len(unet) and all(k.startswith("lora_unet_") for k in delta)
    assert {k for k in delta if k.endswith(".diff_b")} == {transfer.lora_name(k) + ".diff_b" for k in unet
                                                           if k.endswith(".bias")}
    assert delta["lora_unet_out_2.diff"].dtype == torch.float64  # one float wider than the fp32 inputs: exact
    with safe_open(d / "delta.safetensors", "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["vpred_transfer"])["kind"] == "delta" and json.loads(meta["training_config"]) == RECIPE
    assert "zero terminal SNR" in meta["modelspec.description"]

    run("--mode=apply", f"--base={d}/eps.safetensors", f"--delta={d}/delta.safetensors", f"--out={d}/conv/model.safetensors",
        f"--tokenizer={d}/tok")
    out = load_file(d / "conv/model.safetensors")
    assert all(torch.equal(out[k], vpred[k]) for k in unet), "eps + (vpred - eps) is not vpred bit for bit"
    frozen = [k for k in eps if not k.startswith(UNET)]
    assert frozen and all(torch.equal(out[k], eps[k]) for k in frozen), "the VAE or a text encoder changed"
    # detected as v-pred the way a trained export is (tests/test_train.py: markers, our loader, diffusers)
    assert out["v_pred"].numel() == 0 and out["ztsnr"].numel() == 0
    ours = checkpoint.load_checkpoint(str(d / "conv/model.safetensors"))
    assert ours.v_pred and ours.ztsnr and ours.metadata["modelspec.prediction_type"] == "v"
    assert json.loads(ours.metadata["conversion"])["kind"] == "full delta"
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionXLPipeline.from_single_file(
        str(d / "conv/model.safetensors"), config=str(d / "conv/diffusers"), local_files_only=True)
    sc = pipe.scheduler.config
    assert sc.prediction_type == "v_prediction" and sc.beta_end == pytest.approx(0.024)
    assert sc.rescale_betas_zero_snr and sc.timestep_spacing == "trailing"
    from huggingface_hub import ModelCard
    card = ModelCard.load(d / "conv/README.md")
    assert card.data.base_model == "eps.safetensors" and card.data.base_model_relation == "merge"
    assert "transfer.py --mode=apply" in card.text and "`delta.safetensors` (full delta)" in card.text


def test_full_rank_lora_is_the_delta_with_and_without_norms(pair):
    d = pair
    eps, vpred = load_file(d / "eps.safetensors"), load_file(d / "vpred/model.safetensors")
    unet = [k for k in vpred if k.startswith(UNET)]
    outs = {}
    for norms in ("diff", "none"):
        lora = load_file(d / f"lora_{norms}.safetensors")
        assert len({v.item() for k, v in lora.items() if k.endswith(".alpha")}) == 1  # one alpha in the whole file
        # kohya's convolution shapes: down [r, in, 3, 3], up [out, r, 1, 1]
        w = vpred[UNET + "input_blocks.1.0.in_layers.2.weight"]
        up, down = (lora[f"lora_unet_input_blocks_1_0_in_layers_2.lora_{s}.weight"] for s in ("up", "down"))
        assert down.shape == (32, *w.shape[1:]) and up.shape == (w.shape[0], 32, 1, 1)
        state = dict(eps)
        for k in unet:
            name, true = transfer.lora_name(k), vpred[k].double() - eps[k].double()
            if vpred[k].ndim >= 2:
                got = transfer.lora_delta(lora[name + ".lora_up.weight"], lora[name + ".lora_down.weight"],
                                          lora[name + ".alpha"].item(), true.shape)
                assert (got - true).abs().max() <= 1e-5 * true.abs().max(), k  # fp32 factors of an fp64 SVD
            else:
                key = name + (".diff_b" if k.endswith(".bias") else ".diff")
                assert (key in lora) == (norms == "diff")
                got = lora[key].double() if key in lora else torch.zeros_like(true)
            state[k] = (eps[k].double() + got).float()
        outs[norms] = unet_out(state)
    ref, start = unet_out(vpred), unet_out(eps)
    rel = {n: ((o - ref).norm() / (start - ref).norm()).item() for n, o in outs.items()}
    print(f"UNet output error relative to the eps model's, full-rank LoRA: norms and biases kept {rel['diff']:.2e}, "
          f"left out {rel['none']:.2e}")
    assert rel["diff"] < 1e-4 and rel["none"] > 100 * rel["diff"]


def test_diffusers_kohya_loader_gives_our_apply(pair):
    """diffusers' SDXL LoRA loader (kohya keys -> its UNet names -> PEFT, fused) on our LoRA file equals our apply."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    d = pair
    run("--mode=apply", f"--base={d}/base2.safetensors", f"--delta={d}/lora_none.safetensors", "--strength=0.7",
        f"--out={d}/conv_lora/model.safetensors", f"--tokenizer={d}/tok")
    load = lambda path, config: diffusers.StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(config), local_files_only=True)
    ours = load(d / "conv_lora/model.safetensors", d / "conv_lora/diffusers").unet.state_dict()
    pipe = load(d / "base2.safetensors", d / "vpred/diffusers")  # our export's config folder
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(d / "lora_none.safetensors"))
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()
    theirs = pipe.unet.state_dict()
    assert theirs.keys() == ours.keys()
    changed = {k for k in ours if not torch.equal(ours[k], before[k])}
    assert changed == {k for k in theirs if not torch.equal(theirs[k], before[k])} and len(changed) == 204
    worst = max(((theirs[k] - ours[k]).abs().max() / ours[k].abs().max()).item() for k in ours)
    print(f"diffusers' fused LoRA vs our apply: max |difference| / max |weight| = {worst:.1e}")
    assert worst < 1e-6
    # .diff / .diff_b keys (norms and biases kept) are refused by this loader: hence --norms=none for diffusers
    with pytest.raises(ValueError, match="not been correctly renamed"):
        load(d / "base2.safetensors", d / "vpred/diffusers").load_lora_weights(str(d / "lora_diff.safetensors"))


def test_randomized_svd_keeps_what_the_exact_one_keeps():
    """Rank 32 of a 3x3 convolution [320, 320, 3, 3] whose singular values fall as q^i: the randomized SVD keeps
    nearly what the exact one keeps (the Eckart-Young optimum), less where the spectrum is nearly flat."""
    g = torch.Generator().manual_seed(0)
    for q, ratio in ((0.97, 0.9999), (0.995, 0.98)):
        u, _ = torch.linalg.qr(torch.randn(320, 320, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(2880, 320, generator=g, dtype=torch.float64))
        s = q ** torch.arange(320.0, dtype=torch.float64)
        d = (u * s @ v.T).reshape(320, 320, 3, 3)
        kept = {}
        for exact in (True, False):
            up, down = transfer.factors(d, 32, exact)
            assert up.shape == (320, 32, 1, 1) and down.shape == (32, 320, 3, 3)
            kept[exact] = 1 - (d - transfer.lora_delta(up, down, 32, d.shape)).pow(2).sum() / d.pow(2).sum()
        assert kept[True] == pytest.approx((s[:32] ** 2).sum() / (s ** 2).sum())
        assert kept[False] >= ratio * kept[True], (q, kept)


def call(*args):
    """transfer.main in this process with fresh globals (a user mistake raises UserError before any tensor is read)."""
    return importlib.reload(transfer).main([str(a) for a in args])


def test_bad_input_is_one_line(pair, tmp_path):
    d = pair
    ext = ["--mode=extract", f"--eps={d}/eps.safetensors", f"--vpred={d}/vpred/model.safetensors"]
    app = ["--mode=apply", f"--base={d}/base2.safetensors", f"--delta={d}/lora_none.safetensors"]
    cases = [
        (ext + [f"--out={tmp_path}/a.safetensors", "--rank=-1"], "--rank=-1 must be a finite number >= 0"),
        (ext + [f"--out={tmp_path}/a.safetensors", "--norms=some"], "--norms='some' is not one of diff | none"),
        (["--mode=extract", f"--eps={tmp_path}/no.safetensors", f"--vpred={d}/vpred/model.safetensors",
          f"--out={tmp_path}/a.safetensors"], "no such file"),
        (ext + [f"--out={d}/lora_none.safetensors"], "already exists"),
        (ext + [f"--out={d}/eps.safetensors", "--overwrite=True"], "is the --eps file"),
        (ext + [f"--out={tmp_path}/a.pt"], "must name the .safetensors file"),
        (["--mode=extract", f"--eps={d}/vpred/model.safetensors", f"--vpred={d}/eps.safetensors",
          f"--out={tmp_path}/a.safetensors"], "swapped?"),
        (["--mode=extract", f"--eps={d}/lora_none.safetensors", f"--vpred={d}/vpred/model.safetensors",
          f"--out={tmp_path}/a.safetensors"], "a diffusers-format model or a LoRA"),
        (["--mode=apply", f"--base={d}/vpred/model.safetensors", f"--delta={d}/lora_none.safetensors",
          f"--out={tmp_path}/o/model.safetensors"], "already carries the v_pred marker"),
        (["--mode=apply", f"--base={d}/base2.safetensors", f"--delta={d}/base2.safetensors",
          f"--out={tmp_path}/o/model.safetensors"], "are not SDXL UNet LoRA / delta keys"),
        (app + [f"--out={d}/vpred/other.safetensors"], "README.md"),
        (app + [f"--out={tmp_path}/o/model.safetensors", "--strength=nan"], "--strength=nan must be a finite number"),
        (["--mode=convert", f"--out={tmp_path}/a.safetensors"], "--mode='convert' is not one of extract | apply"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError) as e:
            call(*args)
        assert message in str(e.value), (args, str(e.value))
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing written
    # another size of SDXL: the shapes differ
    big = model.SDXLConfig.tiny()
    big.unet.model_channels = 64
    checkpoint.save_checkpoint(model.SDXL(big), tmp_path / "big.safetensors", v_pred=False, ztsnr=False)
    with pytest.raises(ValueError, match="different SDXL sizes"):
        call("--mode=extract", f"--eps={d}/eps.safetensors", f"--vpred={tmp_path}/big.safetensors",
             f"--out={tmp_path}/a.safetensors")
    with pytest.raises(ValueError, match="do not fit its shapes"):
        call("--mode=apply", f"--base={tmp_path}/big.safetensors", f"--delta={d}/lora_none.safetensors",
             f"--out={tmp_path}/o/model.safetensors")
    # on the command line: one line on stderr, exit 2, no traceback
    r = run(*ext, f"--out={d}/eps.safetensors", "--overwrite=True", check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
