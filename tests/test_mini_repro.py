"""mini_repro.py and its two train.py configs: the recipe they encode, the exact latent-scale fold, the curve.
Fast (seconds): the full reproduction itself is `python mini_repro.py` (~80 min on 2 shared CPU cores)."""
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


def fake_quant(t900, x0):
    """A sample_ablation 'quant' block: v-MSE per t-bin (t900 in the last), the same x0 error in every bin."""
    labels = ("0.024 + zsnr, as v", "0.024, as v", "0.012, as v", "0.012, as eps")
    return {"mse_v": [0.1] * 9 + [t900], "recon": {lab: [x0 * (i + 1)] * 10 for i, lab in enumerate(labels)}}


def test_headline_over_seeds_and_transfer_table(mini):
    """The headline is the mean and spread over the seeds' runs, the transfer rows read each model's table."""
    quant = {"eps": fake_quant(2.0, 1.0), "vpred": fake_quant(0.1, 0.05), "vpred_s1338": fake_quant(0.2, 0.04),
             "vpred_s1339": fake_quant(0.05, 0.06)}
    for n, v in [("far_eps", 1.5), ("far_delta", 0.3), ("far_r128", 0.4), ("far_r32", 0.5), ("far_r8", 0.6),
                 ("far_vpred", 0.09)]:
        quant[n] = fake_quant(v, v / 10)
    assert set(quant) == {"eps", "vpred", *mini.table_models()}
    curves = {s: [{"iter": i, "mse_bins": [0.0] * 9 + [v]} for i, v in enumerate(vals)]
              for s, vals in zip(mini.v_seeds, ([9, 0.2, 0.1, 0.3], [9, 0.4, 0.4, 0.4], [9, 9, 0.2, 0.2]))}
    labels = list(quant["eps"]["recon"])
    x0_err = lambda n: {lab: sum(quant[n]["recon"][lab]) / 10 for lab in labels}
    h = mini.seed_headline(quant, curves, 2.0, labels, x0_err)
    assert h["v_mse_t900_ratio"]["values"] == pytest.approx([20.0, 10.0, 40.0])
    assert h["v_mse_t900_ratio"]["mean"] == pytest.approx(70 / 3) and h["v_mse_t900_ratio"]["std"] == \
        pytest.approx(15.275252, rel=1e-6)  # the sample std (n - 1) of 20, 10, 40
    assert (h["v_mse_t900_ratio"]["min"], h["v_mse_t900_ratio"]["max"]) == (10.0, 40.0)
    assert h["curve_t900_final"]["values"] == pytest.approx([0.2, 0.4, 9.4 / 3])  # the mean of the last 3 evals
    assert h["x0_err_mean_over_t"][labels[0]]["values"] == pytest.approx([0.05, 0.04, 0.06])
    rows = mini.transfer_rows(quant, x0_err, labels, {0: 1.0, 128: 0.9, 32: 0.7, 8: 0.4})
    assert [r["model"] for r in rows] == ["far_eps", "far_delta", "far_r128", "far_r32", "far_r8", "far_vpred",
                                         "vpred", "eps"]
    assert [r["v_mse_t900"] for r in rows[:3]] == [1.5, 0.3, 0.4] and rows[2]["share_of_D"] == 0.9
    s = {"x0_err_mean_over_t": {"eps": x0_err("eps")}}
    md = mini.results_md(s, h, rows, {"far_eps_minus_eps": 0.5, "D": 0.1, "D_far": 0.12, "cos_D_D_far": 0.3})
    assert "23.3 ± 15.3 (10.0-40.0)x" in md and "| far fine-tune + rank-32 LoRA of D | 70.00% | 0.0500 | 0.5000 |" in md
    assert "## Commands" in md


def test_far_images_are_not_the_held_out_ones(mini, tmp_path):
    """The far fine-tune's images, cropped to 64x64 as train.py crops them, share no bytes with the base's held-out
    images and are not 64x64 pictures: the transfer table's held-out set is never trained on."""
    import data
    import demo
    base = demo.make_synthetic_dataset(str(tmp_path / "base"), n=40, seed=0, sizes=((64, 64),))
    far = demo.make_synthetic_dataset(str(tmp_path / "far"), n=40, seed=mini.far_seed,
                                      sizes=tuple(map(tuple, mini.far_sizes)))
    held = data.scan_dataset(base, buckets=[(64, 64)], quiet=True)[:mini.eval_items]
    far_items = data.scan_dataset(far, buckets=[(64, 64)], quiet=True)
    assert {it.file_hash for it in held}.isdisjoint(it.file_hash for it in far_items)
    assert all(it.orig_hw != (64, 64) and it.bucket == (64, 64) for it in far_items)


@pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="every stage with tiny counts, ~3 min; RUN_SLOW=1 runs it")
def test_smoke_every_stage(tmp_path):
    """python mini_repro.py end to end with tiny counts: every stage runs, results.json and results.md hold the
    seeds' headline and the transfer table."""
    import json
    import subprocess
    import sys
    out = tmp_path / "mini"
    subprocess.run([sys.executable, "mini_repro.py", f"--out={out}", "--assets=", "--n_images=40", "--eval_items=4",
                    "--vae_steps=2", "--eps_iters=2", "--v_iters=2", "--far_iters=2", "--v_seeds=[1, 2]",
                    "--far_ranks=[4]", "--sample_steps=1"], cwd=ROOT, check=True)
    res = json.load(open(out / "results.json"))
    assert res["seeds"]["seeds"] == [1, 2] and len(res["seeds"]["v_mse_t900_ratio"]["values"]) == 2
    assert [r["model"] for r in res["transfer"]["rows"]] == ["far_eps", "far_delta", "far_r4", "far_vpred", "vpred",
                                                              "eps"]
    assert res["transfer"]["rows"][1]["share_of_D"] == 1.0 and 0 < res["transfer"]["rows"][2]["share_of_D"] < 1
    assert res["transfer"]["weights"]["far_eps_minus_eps"] > 0
    assert "transfer.py --mode=apply" in (out / "results.md").read_text()
