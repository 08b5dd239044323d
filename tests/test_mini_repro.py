"""mini_repro.py and its two train.py configs: the recipe they encode, the exact latent-scale fold, the curve.
Fast (seconds): the full reproduction itself is `python mini_repro.py` (~30 min on 2 CPU cores)."""
import ast
import importlib.util
import os

import pytest
import torch

import configurator
import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_defaults():
    """train.py's config globals, read from its source without running it (non-literal defaults -> None)."""
    tree = ast.parse(open(os.path.join(ROOT, "train.py")).read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                getattr(node.value.func, "attr", "") == "configure":
            return out
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                out[node.targets[0].id] = None
    raise AssertionError("no configurator.configure call in train.py")


def load_config(name):
    g = train_defaults()
    return configurator.configure(g, argv=[os.path.join(ROOT, "config", name)])  # unknown keys raise here


def test_configs_encode_the_recipe():
    eps, v = load_config("mini_eps.py"), load_config("mini_vpred.py")
    assert (eps["prediction"], eps["beta_end"], eps["zsnr"], eps["weighting"]) == ("eps", 0.012, False, "none")
    # the recipe (docs/maths.md §1), only lr and length scaled to the small net
    assert (v["prediction"], v["beta_end"], v["zsnr"], v["weighting"], v["k"]) == ("v", 0.024, True, "sigmoid", 5.0)
    assert v["optimizer"] == "adamw8bit"
    assert (v["beta1"], v["beta2"], v["beta1_final"], v["beta2_final"]) == (0.9, 0.95, 0.95, 0.99)
    assert v["ramp_iters"] == v["max_iters"], "betas ramp over the whole uptrain"
    assert v["init_from"] == os.path.join(eps["out_dir"], "model.safetensors")
    for key in ("dataset_dir", "tokenizer", "cache_dir", "eval_items", "resolution", "bucket_step"):
        assert eps[key] == v[key], key
    assert eps["export_dtype"] == "fp32", "the uptrain starts from the eps export: keep it exact"
    assert v["eval_interval"] <= v["max_iters"] // 10, "the progress curve needs >= 10 points"


@pytest.fixture(scope="module")
def mini():
    spec = importlib.util.spec_from_file_location("mini_repro", os.path.join(ROOT, "mini_repro.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # main() is not run on import
    return mod


def test_latent_fold_is_exact(mini):
    torch.manual_seed(0)
    vae = model.VAE(model.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)).eval()
    with torch.no_grad():  # give the latents an offset and scale far from what the fold must produce
        vae.quant_conv.bias[:4] += torch.tensor([3.0, -2.0, 0.5, 1.0])
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    mean0 = mini.encode(vae, x)
    with torch.no_grad():
        before = vae.decode(mean0)
    mu, sd = mini.normalise_latents_(vae, mean0)
    mean1 = mini.encode(vae, x)
    with torch.no_grad():
        after = vae.decode(mean1)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)  # same images out of the decoder
    scaled = mean1 * model.VAE_SCALE  # what the UNet sees
    torch.testing.assert_close(scaled.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(scaled.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(mean1, (mean0 - mu.view(1, -1, 1, 1)) / (sd * model.VAE_SCALE).view(1, -1, 1, 1),
                               atol=1e-4, rtol=1e-4)


def test_progress_curve_png(mini, tmp_path):
    from PIL import Image
    curve = [{"iter": it, "mse_bins": [0.1 * (b + 1) / (1 + it / 10) for b in range(10)]} for it in (0, 10, 20, 30)]
    path = tmp_path / "curve.png"
    mini.draw_curve(str(path), curve)
    im = Image.open(path)
    assert im.size == (560, 340)
    assert len(im.convert("RGB").getcolors(1 << 16)) > 3  # axes, text and coloured lines were drawn
