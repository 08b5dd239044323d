"""The model card (card.py) as Hugging Face reads it: huggingface_hub's own ModelCard parser on the card that
export.write_export puts beside a tiny export, the metadata, and the text naming each sampler setting and each UI."""
import json

import pytest
import torch

import card
import export
import model
import sample_ablation

ModelCard = pytest.importorskip("huggingface_hub").ModelCard

# train.py's training_config keys, as its export writes them
RECIPE = {"prediction": "v", "beta_start": 0.00085, "beta_end": 0.024, "zsnr": True, "weighting": "sigmoid", "k": 5.0,
          "optimizer": "adamw8bit", "lr": 7.5e-6, "beta1": 0.9, "beta2": 0.95, "beta1_final": 0.95,
          "beta2_final": 0.99, "max_iters": 1000, "batch_size": 4, "global_batch": 4,
          "base": "hf:stabilityai/stable-diffusion-xl-base-1.0/sd_xl_base_1.0_0.9vae.safetensors"}
SETTINGS = ("v_prediction", "rescale_betas_zero_snr=True", "beta_end=0.024", "trailing", "guidance_rescale=0.7")
UIS = ("from_single_file", 'config="diffusers"', "local_files_only=True", "ComfyUI", "ModelSamplingDiscrete", "zsnr",
       "RescaleCFG", "Forge", "reForge", "AUTOMATIC1111", "Zero Terminal SNR", "InvokeAI", "Prediction Type")


def ablation_json(path, ckpt):
    """A result in sample_ablation.py's layout: its default four panels, an error table of 10 t-bins each."""
    panels = sample_ablation.panel_list(sample_ablation.panels) + sample_ablation.panel_list([(0.012, True, "v")])
    errors = {p["label"]: [0.04 * (1 + i) * (1.25 if p["beta_end"] == 0.012 else 1) for i in range(10)] for p in panels}
    errors[panels[3]["label"]] = [37.0] * 10
    result = {"ckpt_path": ckpt, "timesteps": list(range(999, 0, -40)),
              "panels": [{k: v for k, v in p.items() if k != "abar"} for p in panels],
              "quant": {"recon": errors, "n": 8, "dataset": "synthetic shapes, seed 1234", "mse_v": [0.1] * 10,
                        "mse_eps": [1.0] * 10}}
    path.write_text(json.dumps(result))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("card")
    sdxl = model.init_random_(model.SDXL(model.SDXLConfig.tiny()), seed=0)
    written = export.write_export(d, sdxl, RECIPE, dtype=torch.float16)
    return d, written


def test_export_writes_a_card_huggingface_parses(exported):
    d, written = exported
    assert written == ["model.safetensors", "diffusers/", "README.md"]
    c = ModelCard.load(d / "README.md")
    assert c.data.base_model == "stabilityai/stable-diffusion-xl-base-1.0" and c.data.license == "openrail++"
    assert {"stable-diffusion-xl", "v-prediction", "zero-terminal-snr", "text-to-image"} <= set(c.data.tags)
    assert c.data.pipeline_tag == "text-to-image" and c.data.library_name == "diffusers"
    for text in SETTINGS + UIS + ("hf upload", "huggingface-cli upload", "1000 at global batch 4", "k = 5"):
        assert text in c.text, text
    assert "Not measured for this model yet" in c.text and "python sample_ablation.py" in c.text
    assert "max_token_length" not in c.text and "prompt length" not in c.text


def test_local_base_and_long_prompts():
    recipe = dict(RECIPE, base="data/tiny/start.safetensors", max_token_length=225)
    c = ModelCard(card.render(recipe))
    assert c.data.base_model == "start.safetensors" and "license" not in c.data.to_dict()
    assert "| prompt length | 225 tokens" in c.text and "add a `license:` line" in c.text


def test_card_rewritten_with_the_ablation(exported, tmp_path):
    d, _ = exported
    path = ablation_json(tmp_path / "ablation.json", str(d / "model.safetensors"))
    card.card_from_export(str(d), ablation_path=str(path))
    c = ModelCard.load(d / "README.md")
    assert c.data.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    # panel 1 (the training schedule) mean 0.22, panel 3 (0.012 read as v) 1.25x that, and the UIs' 0.012 + zsnr
    assert "| 0.024 + zsnr, as v (the training schedule) | 0.2200 |" in c.text
    assert "| 0.012, as v | 0.2750 (1.25x) |" in c.text and "| 0.012 + zsnr, as v | 0.2750 (1.25x) |" in c.text
    assert "8 held-out latents (synthetic shapes, seed 1234)" in c.text and "Not measured" not in c.text
    with pytest.raises(ValueError, match="no such file"):
        card.card_from_export(str(d), ablation_path=str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a sample_ablation.py result"):
        card.card_from_export(str(d), ablation_path=str(tmp_path / "bad.json"))
