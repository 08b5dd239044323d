"""
A run is never lost or silently changed (third round): a resume keeps the recipe and the EMA, --overwrite=True
means a clean run folder, a complete run whose export is missing still exports, a recoverable ckpt.old/ counts
as a run, and what the config or the files can show (a learning rate or weighting that trains nothing, a run
folder inside the dataset, previews the model cannot sample, prompts that are not text, a training set of
held-out copies, a caption that is a folder) is one line before the cache is built.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from test_reliability import one_line, run, snapshot


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A dataset, vocabulary, start checkpoint and cache made by train.py itself, and an eps run of 1 step on
    the pretrain schedule with an EMA."""
    d = tmp_path_factory.mktemp("reliable3")
    common = ["config/tiny.py", f"--dataset_dir={d}/images", f"--tokenizer={d}/tokenizer", f"--cache_dir={d}/cache",
              f"--init_from={d}/start.safetensors", "--make_synthetic=12", "--eval_items=2", "--log_interval=1",
              "--eval_interval=0", "--ckpt_interval=0"]
    r = run(*common, f"--out_dir={d}/eps", "--max_iters=1", "--prediction=eps", "--beta_end=0.012", "--zsnr=False",
            "--ema_decay=0.9")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return d, common


def meta(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata(), set(f.keys())


def test_resume_keeps_the_recipe_and_the_ema(tiny, tmp_path):
    d, common = tiny
    shutil.copytree(d / "eps", tmp_path / "eps")
    # keys not given take the saved values: still eps on 0.012 without zsnr, still with its EMA
    r = run(*common, f"--out_dir={tmp_path}/eps", "--init_from=resume", "--max_iters=2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resume: max_iters 1 -> 2" in r.stdout
    metadata, keys = meta(tmp_path / "eps" / "model.safetensors")
    assert "v_pred" not in keys and "ztsnr" not in keys
    assert json.loads(metadata["noise_schedule"])["beta_end"] == 0.012
    assert json.loads(metadata["training_config"])["prediction"] == "eps"
    assert os.path.getmtime(tmp_path / "eps" / "model_ema.safetensors") >= os.path.getmtime(tmp_path / "eps" / "ckpt.pt")
    # a key that defines what is trained, given anew: refused, naming each key, its saved and its new value
    before = snapshot(tmp_path / "eps")
    line = one_line(run(*common, f"--out_dir={tmp_path}/eps", "--init_from=resume", "--max_iters=3",
                        "--prediction=v", "--zsnr=True", "--ema_decay=0.5"), "as another run")
    assert "--prediction saved 'eps', now 'v'" in line and "--zsnr saved False, now True" in line
    assert "--ema_decay saved 0.9, now 0.5" in line
    assert snapshot(tmp_path / "eps") == before


def test_a_complete_run_without_its_export_exports(tiny, tmp_path):
    d, common = tiny
    shutil.copytree(d / "eps", tmp_path / "eps")
    os.remove(tmp_path / "eps" / "model.safetensors")  # killed while exporting
    r = run(*common, f"--out_dir={tmp_path}/eps", "--init_from=resume", "--max_iters=1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "export is missing or older: exporting it" in r.stdout
    assert (tmp_path / "eps" / "model.safetensors").exists()
    # exported and complete: resuming again says how to train further
    one_line(run(*common, f"--out_dir={tmp_path}/eps", "--init_from=resume", "--max_iters=1"), "at iter 1 already")


def test_overwrite_means_a_clean_run_folder(tiny, tmp_path):
    d, common = tiny
    out = tmp_path / "run"
    shutil.copytree(d / "eps", out)
    (out / "eval.jsonl").write_text('{"iter": 1}\n')
    (out / "samples").mkdir()
    (out / "samples" / "iter_000001.png").write_bytes(b"old")
    (out / "ckpt").mkdir()  # an old sharded state that a later resume would take
    (out / ".model.safetensors.a1b2c3d4.tmp").write_bytes(b"a killed export")
    (out / "notes.txt").write_text("the user's")
    r = run(*common, f"--out_dir={out}", "--max_iters=1", "--overwrite=True")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    left = set(os.listdir(out))
    assert not {"eval.jsonl", "samples", "ckpt", "model_ema.safetensors", ".model.safetensors.a1b2c3d4.tmp"} & left
    assert {"notes.txt", "model.safetensors", "ckpt.pt"} <= left
    assert (out / "notes.txt").read_text() == "the user's"


def test_a_recoverable_sharded_state_is_a_run(tiny, tmp_path):
    d, common = tiny
    (tmp_path / "run" / "ckpt.old").mkdir(parents=True)  # a crash between save_sharded's two renames
    one_line(run(*common, f"--out_dir={tmp_path}/run", "--max_iters=1"), "holds a run already")
    assert (tmp_path / "run" / "ckpt.old").is_dir()


def test_what_the_config_and_files_show_is_one_line_up_front(tiny, tmp_path):
    d, common = tiny
    fresh = [a for a in common if not a.startswith("--cache_dir")] + [f"--cache_dir={tmp_path}/cache"]
    out = f"--out_dir={tmp_path}/out"
    one_line(run(*fresh, out, "--lr=0"), "--lr=0.0 trains nothing")
    one_line(run(*fresh, out, "--weighting=min_snr", "--gamma=0"), "zero at every t")
    one_line(run(*fresh, f"--out_dir={d}/images/runs"), "is in the dataset folder")
    one_line(run(*fresh, out, "--sample_interval=1", "--sample_prompts=[1, 2]"), "must be a list of strings")
    r = run(*fresh, out, "--sample_interval=1", "--resolution=112", "--bucket_step=32")
    one_line(r, "previews", "--resolution=112")
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")
    # a training set that is only copies of the held-out images; metadata.jsonl that is a folder
    images = tmp_path / "copies"
    images.mkdir()
    src = sorted(p for p in os.listdir(d / "images") if p.endswith(".png"))[0]
    for i in range(3):
        shutil.copy(d / "images" / src, images / f"{i}.png")
    one_line(run(*fresh, out, f"--dataset_dir={images}", "--eval_items=1"), "copies of held-out ones")
    (images / "metadata.jsonl").mkdir()
    one_line(run(*fresh, out, f"--dataset_dir={images}", "--eval_items=1"), "metadata.jsonl is not a file")
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_a_quantised_start_checkpoint_is_refused_before_the_scan(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    d, common = tiny
    weights = load_file(str(d / "start.safetensors"))
    key = next(k for k in weights if k.endswith("in_layers.2.weight"))
    weights[key] = weights[key].to(torch.int8)
    save_file(weights, str(tmp_path / "int8.safetensors"))
    r = run(*common, f"--out_dir={tmp_path}/out", f"--init_from={tmp_path}/int8.safetensors",
            f"--cache_dir={tmp_path}/cache")
    one_line(r, "not floating point", "quantised")
    assert "scan" not in r.stdout
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")
