"""
tests/gpu/run.sh and its collector without a GPU: collect.py on sample log lines and records, and the whole script
in its dry-run mode (every stage on CPU with the tiny model, 2-3 steps) producing results.json and results.md.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "gpu"))
import collect  # noqa: E402

TYPES = {"mode": str, "device": str, "torch": str, "img_s": (float, type(None)), "ms_step": (float, type(None)),
         "mfu": (float, type(None)), "peak_gib": (float, type(None)), "compile_s": (float, type(None)),
         "ratio_vs_diffusers": float, "command": str, "git_sha": str}

TRAIN_LOG = """$ python3 train.py --init_from=random --batch_size=4 --compile=True --max_iters=15 --log_interval=5
global batch 4 = 4 micro x 1 accum x 1 procs
compiled bucket 1024x1024: 171.3 s
compiled bucket 832x1216: 40.5 s
compiled 2 buckets in 211.8 s
first step (compile, cuDNN autotune) 1.9 s
iter 5: loss 0.12000, lr 7.5e-06, betas (0.9000, 0.9500), gnorm 1.2, 9.10 img/s, 440 ms/it, mfu 18.6%, mem 60.1GiB, skipped 0, eta 0.1 min
  t-bin mse 0.1 0.2 - - - - - - - -
iter 10: loss 0.11000, lr 7.5e-06, betas (0.9001, 0.9501), gnorm 1.1, 20.00 img/s, 200 ms/it, mfu 40.9%, mem 61.5GiB, skipped 0, eta 0.0 min
iter 15: loss 0.10000, lr 7.5e-06, betas (0.9002, 0.9502), gnorm 1.0, 22.00 img/s, 182 ms/it, mfu 45.0%, mem 61.0GiB, skipped 0, eta 0.0 min
"""


def test_collector_reads_logs_and_records(tmp_path):
    (tmp_path / "train.log").write_text(TRAIN_LOG)
    bench = {"mode": "default_compiled", "side": "ours", "device": "NVIDIA H200", "device_type": "cuda",
             "torch": "2.11.0+cu130", "img_s": 21.0, "ms_step": 190.5, "mfu": 42.9, "peak_gib": 60.2, "compile_s": 30.1,
             "ratio_vs_diffusers": 1.25, "command": "python bench.py --compare=diffusers", "git_sha": "abc", "extra": 1}
    theirs = dict(bench, mode="diffusers_compiled", side="diffusers", img_s=16.8)
    del theirs["ratio_vs_diffusers"]
    small = dict(theirs, mode="24gb", side="ours", peak_gib=21.5)
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (bench, theirs, small)))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11.0+cu130", "git_sha": "def"}))
    records, notes = collect.collect(str(tmp_path), str(run))
    train = records[0]
    assert train["mode"] == "train_e2e" and train["command"].startswith("python3 train.py --init_from=random")
    assert train["img_s"] == pytest.approx(21.0) and train["ms_step"] == pytest.approx(191.0)  # iters after the first
    assert train["mfu"] == pytest.approx(42.95) and train["peak_gib"] == 61.5 and train["compile_s"] == 211.8
    assert (train["device"], train["git_sha"]) == ("NVIDIA H200", "def")
    assert "train_e2e: compile per bucket 1024x1024 171.3 s, 832x1216 40.5 s" in notes
    assert [r["mode"] for r in records[1:]] == ["default_compiled", "diffusers_compiled", "24gb"]
    assert "extra" not in records[1] and records[1]["ratio_vs_diffusers"] == 1.25
    lines = collect.verdicts(records, collect.targets())
    assert lines == ["target 20 img/s (default mode, compiled, batch 4, 1024^2): 21.00 img/s, met",
                     "target ratio 1.3x diffusers: 1.25, missed", "target 24 GB mode peak <= 21 GiB: 21.5 GiB, missed"]
    md = collect.markdown(records, notes, lines)
    assert sum(l.startswith("| ") for l in md.splitlines()) == 1 + 4 and "| train_e2e | NVIDIA H200 | 2.11.0+cu130 | 21.00 | 191.0 |" in md


def test_dry_run_writes_valid_results(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, GPU_DRY_RUN="1", OUT=str(out), TMPDIR=str(tmp_path), GPU_RESULTS_REPO=str(tmp_path / "repo"))
    r = subprocess.run(["bash", "tests/gpu/run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = json.loads((out / "results.json").read_text())
    modes = [rec["mode"] for rec in records]
    assert modes == ["train_e2e", "train_resume", "default_compiled", "diffusers_compiled", "24gb", "default_eager",
                     "sdpa_flash", "sdpa_cudnn"], r.stdout[-3000:]
    for rec in records:
        assert set(TYPES) - {"ratio_vs_diffusers"} <= set(rec) <= set(TYPES), rec
        for key, value in rec.items():
            assert isinstance(value, TYPES[key]), (key, value)
    assert records[0]["img_s"] > 0 and records[0]["compile_s"] > 0  # steady steps after the first, timed compiles
    assert records[2]["ratio_vs_diffusers"] == pytest.approx(records[2]["img_s"] / records[3]["img_s"])
    assert len(os.listdir(out)) <= 8  # the device tool returns at most 8 files
    assert (tmp_path / "repo" / "assets" / "gpu" / "results.json").read_text() == (out / "results.json").read_text()
    md = (out / "results.md").read_text()
    assert "export: model.safetensors" in md and "written" in md and "not measured" in md  # CPU: no target judged
