"""configurator.py: nanoGPT semantics (config files, --key=value, later wins) plus the fixed edges."""
import os
import subprocess
import sys

import pytest

import configurator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fresh():
    return {"__file__": "x.py", "lr": 1e-5, "batch_size": 4, "compile": True, "out_dir": "out",
            "betas": (0.9, 0.95), "init_from": "hf:a/b", "wandb_project": None}


def test_overrides_and_types(tmp_path):
    g = fresh()
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\nbatch_size = 8\nlr = batch_size * 1e-7\n_private = 3\n")
    out = configurator.configure(g, [str(cfg), "--batch_size=2", "--lr=1", "--compile=false",
                                     "--out_dir=2024", "--betas=[0.8, 0.9]", "--init_from=resume"])
    assert g["batch_size"] == 2  # later wins
    assert g["lr"] == 1.0 and isinstance(g["lr"], float)  # int accepted for a float
    assert g["compile"] is False
    assert g["out_dir"] == "2024"
    assert g["betas"] == (0.8, 0.9) and isinstance(g["betas"], tuple)
    assert g["init_from"] == "resume"
    assert out["batch_size"] == 2 and "__file__" not in out


def test_config_file_sees_current_values(tmp_path):
    g = fresh()
    cfg = tmp_path / "c.py"
    cfg.write_text("lr = lr * 0.5\n")
    configurator.configure(g, ["--lr=4e-6", str(cfg)])
    assert g["lr"] == pytest.approx(2e-6)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'batchsize'.*--batch_size"):
        configurator.configure(fresh(), ["--batchsize=3"])
    with pytest.raises(ValueError, match="expects int"):
        configurator.configure(fresh(), ["--batch_size=2.5"])
    with pytest.raises(ValueError, match="expects bool"):
        configurator.configure(fresh(), ["--compile=maybe"])
    with pytest.raises(ValueError, match="expected --key=value"):
        configurator.configure(fresh(), ["--compile"])
    cfg = tmp_path / "c.py"
    cfg.write_text("learning_rate = 1e-6\n")
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        configurator.configure(fresh(), [str(cfg)])
    with pytest.raises(FileNotFoundError):
        configurator.configure(fresh(), ["config/nope.py"])


def test_repo_relative_config_from_other_dir(tmp_path, monkeypatch):
    # config/… paths resolve against the repo too, so scripts run from any working directory
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(__file__, ROOT)  # a file that exists only relative to the repo root
    assert configurator._find_file(rel) == os.path.join(configurator.REPO, rel)


def test_help_lists_keys_with_comments(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(f"import sys; sys.path.insert(0, {ROOT!r})\n"
                      "# ---\nlr = 3e-6  # learning rate (after warmup)\nsteps = 10  # optimizer steps\n# ---\n"
                      "import configurator\nconfigurator.configure(globals())\nprint('ran')\n")
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--lr=3e-06" in r.stdout and "learning rate (after warmup)" in r.stdout
    assert "--steps=10" in r.stdout and "ran" not in r.stdout


def test_given_keys_and_train_defaults(tmp_path):
    """The keys a config file assigns or --key=value sets are recorded (a resume keeps the saved others), and
    bench.py reads train.py's keys and defaults from its source, without running it."""
    g = fresh()
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 8\nlr = batch_size * 1e-7\n")
    configurator.configure(g, [str(cfg), "--compile=false"])
    assert g["_given"] == {"batch_size", "lr", "compile"}
    train = configurator.script_defaults(os.path.join(ROOT, "train.py"))
    assert train["k"] == 5.0 and train["beta_end"] == 0.024 and train["compile_scope"] == "unet"
    assert train["device"] in ("cpu", "cuda") and not any(k.startswith("_") for k in train)


def test_help_sets_debug_keys_apart():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    lines = out.splitlines()
    assert "# the recipe" in lines and lines.index("# the recipe") < lines.index("# debugging and tests, not training settings")
    after = lines[lines.index("# debugging and tests, not training settings") + 1:]
    assert after and all(line.lstrip().startswith("--debug_") for line in after)
    bench = subprocess.run([sys.executable, "bench.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "--k=5.0" in bench and "sigmoid weighting offset" in bench and "--compare=''" in bench
