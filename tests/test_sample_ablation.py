"""sample_ablation.py: the panel definitions, shared initial noise, the panel readings against an oracle model,
the quantitative table, and the script end to end on a tiny random checkpoint (CPU, ~20-40 s)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import demo
from configurator import UserError
import checkpoint
import export
import model
import sample_ablation as SA
import schedule as S
import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a red circle on a blue background", "a photo of a cat", "a green square on a white background"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random SDXL-topology checkpoint saved through the production saver, with train.py's export layout
    for the tokenizer (<ckpt dir>/diffusers/tokenizer/), so the script finds it by default."""
    d = tmp_path_factory.mktemp("tiny")
    sdxl = model.init_random_(model.SDXL(model.SDXLConfig.tiny()), seed=0)
    path = str(d / "model.safetensors")
    checkpoint.save_checkpoint(sdxl, path, v_pred=True, ztsnr=True)
    demo.build_tiny_vocab(str(d / "diffusers" / "tokenizer"), CAPTIONS)
    return path


def run_script(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample_ablation.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


# -----------------------------------------------------------------------------
# panels and noise

def test_default_panels():
    pds = SA.panel_list(SA.panels)
    got = [(p["beta_end"], p["zsnr"], p["prediction"]) for p in pds]
    assert got == [(0.024, True, "v"), (0.024, False, "v"), (0.012, False, "v"), (0.012, False, "eps")]
    for p in pds:  # each panel samples on its own schedule
        assert torch.equal(p["abar"], S.alphas_cumprod(p["beta_end"], p["zsnr"]))
    assert [p["abar"][999].item() == 0.0 for p in pds] == [True, False, False, False]
    assert len({p["label"] for p in pds}) == 4
    SA.check_sampling(pds)  # the defaults are all samplable


def test_panel_specs_and_eps_zsnr_rejected():
    (p,) = SA.panel_list([(0.024, True, "v")])
    assert p["label"] == "0.024 + zsnr, as v"  # label optional
    with pytest.raises(UserError, match="prediction"):  # a user's mistake: one line, no traceback
        SA.panel_list([(0.012, False, "x0")])
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        SA.check_sampling(SA.panel_list([(0.024, True, "eps", "bad")]))


def test_eps_zsnr_fails_before_loading():
    r = run_script("--ckpt=/nonexistent.safetensors", "--out=/tmp/never.png", "--panels=[(0.024, True, 'eps')]")
    assert r.returncode != 0 and "zero-terminal-SNR" in r.stderr, r.stderr[-2000:]


def test_long_prompts(tiny_ckpt):
    """max_token_length=225: prompts as three 77-position chunks (a short prompt's first chunk is its single-row
    encoding), sampled through the UNet; a length that is not 75 | 150 | 225 is refused before anything is read."""
    sdxl = checkpoint.load_checkpoint(tiny_ckpt)
    tok = tokenizer.load_tokenizer(os.path.join(os.path.dirname(tiny_ckpt), "diffusers"))
    prompts = [CAPTIONS[0], ", ".join(CAPTIONS * 12)]
    c75, p75 = SA.encode_prompts(sdxl, tok, prompts, "cpu")
    c225, p225 = SA.encode_prompts(sdxl, tok, prompts, "cpu", max_token_length=225)
    assert c75.shape == (2, 77, 192) and c225.shape == (2, 231, 192) and p225.shape == p75.shape == (2, 128)
    torch.testing.assert_close(c225[0, :77], c75[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p225[0], p75[0], rtol=1e-5, atol=1e-6)
    imgs = SA.generate(sdxl, c225, p225, SA.initial_noise([0, 1], (4, 8, 8)), S.alphas_cumprod(0.024, True), 2)
    assert imgs.shape == (2, 3, 64, 64) and imgs.isfinite().all()
    r = run_script("--ckpt=/nonexistent.safetensors", "--out=/tmp/never.png", "--max_token_length=100")
    assert r.returncode == 2 and "--max_token_length=100 is not one of 0 | 75 | 150 | 225" in r.stderr, r.stderr[-2000:]


def test_prompt_length_from_the_models_metadata(tmp_path):
    """--max_token_length=0 (the default) samples with the prompt length the model was trained with, read from
    the training_config metadata that train.py's export writes; a file without it (or with a value this code does
    not know) gets SDXL's 75."""
    recipe = {"prediction": "v", "beta_start": 0.00085, "beta_end": 0.024, "zsnr": True, "max_token_length": 150}
    sdxl = model.init_random_(model.SDXL(model.SDXLConfig.tiny()), seed=0)
    path = str(tmp_path / "model.safetensors")
    checkpoint.save_checkpoint(sdxl, path, v_pred=True, ztsnr=True, metadata=export.export_metadata(recipe))
    assert SA.trained_token_length(checkpoint.load_checkpoint(path).metadata) == 150
    for meta in ({}, {"training_config": "{not json"}, {"training_config": json.dumps({"max_token_length": 100})},
                 {"training_config": json.dumps([1])}):
        assert SA.trained_token_length(meta) == 75, meta


def test_identical_seeds_identical_noise(monkeypatch):
    a = SA.initial_noise([0, 1, 0], (4, 8, 8))
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    assert torch.equal(a, SA.initial_noise([0, 1, 0], (4, 8, 8)))
    # render hands every panel the same noise for a row, and lays the grid out row-major
    seen = []

    def fake_generate(sdxl, context, pooled, noise, abar, steps, prediction, guidance, phi, h, w, amp_dtype):
        seen.append((abar, noise.clone()))
        col = len({id(a) for a, _ in seen}) - 1
        return torch.stack([torch.full((3, 2, 2), 10.0 * col + float(context[i, 0, 0])) for i in range(len(noise))])

    monkeypatch.setattr(SA, "generate", fake_generate)
    pds = SA.panel_list(SA.panels)
    rows = 5
    context = torch.arange(rows, dtype=torch.float32)[:, None, None].expand(rows, 77, 3)
    imgs = SA.render(None, context, torch.zeros(rows, 2), a.repeat(2, 1, 1, 1)[:rows], pds, 2, 5.0, 0.7, 16, 16,
                     batch_size=2)
    assert imgs.shape == (rows * 4, 3, 2, 2)
    assert [imgs[k, 0, 0, 0].item() for k in range(rows * 4)] == [10.0 * c + r for r in range(rows) for c in range(4)]
    assert len(seen) == 4 * 3  # 4 panels x 3 chunks of <= 2 rows
    for k in range(3):  # chunk k of every panel started from the same noise
        for c in range(1, 4):
            assert torch.equal(seen[c * 3 + k][1], seen[k][1])


def test_save_grid_no_labels(tmp_path):
    imgs = torch.linspace(-1, 1, 6)[:, None, None, None].expand(6, 3, 5, 7)
    SA.save_grid(imgs, 2, 3, str(tmp_path / "g.png"))
    a = np.asarray(Image.open(tmp_path / "g.png"))
    assert a.shape == (10, 21, 3)
    assert a[0, 0, 0] == 0 and a[9, 20, 0] == 255  # -1 -> 0, +1 -> 255; row-major placement
    assert a[0, 14, 0] == round((float(imgs[2, 0, 0, 0]) + 1) * 127.5)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


# -----------------------------------------------------------------------------
# the readings against an oracle model

def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(n, 4, 8, 8, generator=g,
                                                                                dtype=torch.float64)


@pytest.mark.parametrize("beta_end,zsnr", [(0.024, True), (0.024, False), (0.012, False), (0.012, True)])
def test_read_x0_oracle(beta_end, zsnr):
    x0, noise = _data(5)
    abar = S.alphas_cumprod(beta_end, zsnr)
    t = torch.tensor([0, 1, 500, 998, 999])
    z = S.add_noise(x0, noise, t, abar)
    torch.testing.assert_close(SA.read_x0(S.v_target(x0, noise, t, abar), z, t, abar, "v"), x0, rtol=0, atol=1e-12)
    if zsnr:  # eps at abar = 0: undefined -> NaN, not a crash
        assert SA.read_x0(noise, z, t, abar, "eps").isnan().all()
        t = t[:-1]
        x0, noise, z = x0[:-1], noise[:-1], z[:-1]
    torch.testing.assert_close(SA.read_x0(noise, z, t, abar, "eps"), x0, rtol=0, atol=1e-10)


def _lstsq_v_oracle(x0, noise):
    """A model that knows x0 and eps: recovers (alpha, sigma) of whatever schedule made z = alpha x0 + sigma eps
    by least squares and returns the exact v = alpha eps - sigma x0. Exact on every panel's schedule."""
    X, N = x0.flatten(1), noise.flatten(1)

    def fn(z, t):
        Z = z.flatten(1)
        G = torch.stack([torch.stack([(X * X).sum(1), (X * N).sum(1)], -1),
                         torch.stack([(X * N).sum(1), (N * N).sum(1)], -1)], -2)  # (B, 2, 2)
        a, s = torch.linalg.solve(G, torch.stack([(X * Z).sum(1), (N * Z).sum(1)], -1)).unbind(-1)
        return (a[:, None] * N - s[:, None] * X).view_as(z)
    return fn


def test_quant_oracle_models():
    x0, noise = _data(8)
    train = S.alphas_cumprod(0.024, True)
    pds = SA.panel_list(SA.panels)
    labels = [p["label"] for p in pds]
    # a perfect v model: zero v error, exact x0 under every v reading, the eps reading fails at high t
    r = SA.quant_ablation(_lstsq_v_oracle(x0, noise), x0, noise, pds, train)
    assert r["bins"] == [[100 * b, 100 * b + 99] for b in range(10)] and r["n"] == 8
    assert max(r["mse_v"]) < 1e-20 and min(r["mse_eps"]) > 0
    for lab in labels[:3]:
        assert max(r["recon"][lab]) < 1e-20, (lab, r["recon"][lab])
    assert r["recon"][labels[3]][9] > 1.0 and r["recon"][labels[3]][0] < 0.05
    # a perfect eps model: exact x0 under the eps reading, the v readings fail at high t
    r = SA.quant_ablation(lambda z, t: noise, x0, noise, pds, train)
    assert max(r["mse_eps"]) == 0.0 and min(r["mse_v"]) > 0
    assert max(r["recon"][labels[3]]) < 1e-18
    assert r["recon"][labels[0]][9] > 0.5 and r["recon"][labels[0]][0] < 1e-2
    # an eps reading on a zsnr schedule: NaN exactly in the bin holding t=999, a '-' in the table
    bad = SA.panel_list([(0.024, True, "eps", "eps on zsnr")])
    r = SA.quant_ablation(lambda z, t: noise, x0, noise, bad, train)
    vals = r["recon"]["eps on zsnr"]
    assert math.isnan(vals[9]) and all(math.isfinite(v) for v in vals[:9]) and max(vals[:9]) < 1e-16
    last = SA.format_table(r).splitlines()[-1].split()
    assert last[0] == "900-999" and last[-1] == "-"


# -----------------------------------------------------------------------------
# the script end to end

def test_script_end_to_end(tiny_ckpt, tmp_path):
    out = str(tmp_path / "grid.png")
    r = run_script(f"--ckpt={tiny_ckpt}", f"--out={out}", "--steps=2", "--height=64", "--width=64",
                   f"--prompts={CAPTIONS[0]}", "--seeds=[3]", "--quant_n=2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    im = np.asarray(Image.open(out).convert("RGB")).astype(np.float32)
    H, W = 64, 64
    assert im.shape[1] == 120 + 4 * W  # label column + 4 panels
    assert H < im.shape[0] < 2 * H  # a header band + 1 row
    cells = im[-H:, -4 * W:]
    assert cells.std() > 5, "blank grid"
    with open(os.path.splitext(out)[0] + ".json") as f:
        js = json.load(f)
    assert js["height"] == H and js["width"] == W and js["config"]["steps"] == 2
    assert js["timesteps"] == [999, 499]
    assert js["tokenizer"].endswith("diffusers") and js["ckpt_markers"]["v_pred"] is True
    assert js["rows"] == [{"prompt": CAPTIONS[0], "seed": 3}]
    assert js["max_token_length"] == 75  # a file with no training_config: SDXL's single chunk
    assert [(p["beta_end"], p["zsnr"], p["prediction"]) for p in js["panels"]] == \
        [(0.024, True, "v"), (0.024, False, "v"), (0.012, False, "v"), (0.012, False, "eps")]
    q = js["quant"]
    assert len(q["bins"]) == 10 and q["n"] == 2
    for key in ("mse_v", "mse_eps"):
        assert len(q[key]) == 10 and all(math.isfinite(v) for v in q[key])
    assert list(q["recon"]) == [p["label"] for p in js["panels"]]
    for vals in q["recon"].values():
        assert len(vals) == 10 and all(math.isfinite(v) for v in vals)
    assert "mse vs v" in r.stdout and "900-999" in r.stdout
