"""
tests/gpu/run.sh and its collector without a GPU: collect.py on sample log lines and records, and the whole script
in its dry-run mode (every stage on CPU with the tiny model, 2-3 steps) producing results.json and results.md.
"""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "gpu"))
import collect  # noqa: E402

STAGES = ["compiled", "24gb", "train_e2e", "diffusers_compiled", "scope_blocks", "train_resume", "default_eager",
          "sdpa_flash", "sdpa_cudnn", "scope_unet"]  # the default order of tests/gpu/run.sh
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
             "compiled": True, "precision": "amp", "grad_ckpt": False, "batch_size": 4,
             "command": "python bench.py", "git_sha": "abc", "extra": 1}
    # timed in another process (its own command), after the 24 GB mode's record: paired by the step, not the line
    theirs = dict(bench, mode="diffusers_compiled", side="diffusers", img_s=16.8,
                  command="python bench.py --compare=diffusers --measure=diffusers")
    small = dict(bench, mode="24gb", side="ours", peak_gib=21.5, precision="bf16", grad_ckpt=True, batch_size=1,
                 command="python bench.py --precision=bf16")
    lines = [json.dumps(r) + "\n" for r in (bench, small, theirs)]
    cut = json.dumps(dict(small, mode="default_eager"))[:70] + "\n"  # a line cut by a kill mid-write
    (tmp_path / "records.jsonl").write_text(lines[0] + cut + lines[1] + lines[2] + "[1, 2]\n")
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
    assert "train_e2e: 3 log lines, last iter 15, not exported" in notes
    assert [r["mode"] for r in records[1:]] == ["default_compiled", "24gb", "diffusers_compiled"]
    damaged = [n for n in notes if n.startswith("records.jsonl line")]
    assert len(damaged) == 2 and damaged[0].startswith("records.jsonl line 2 skipped (damaged"), notes
    # the ratio from the two compiled records; none on the record of another step
    assert "extra" not in records[1] and records[1]["ratio_vs_diffusers"] == pytest.approx(1.25)
    assert "ratio_vs_diffusers" not in records[2] and "ratio_vs_diffusers" not in records[3]
    lines = collect.verdicts(records, collect.targets())
    assert lines == ["target 20 img/s (default mode, compiled, batch 4, 1024^2): 21.00 img/s, met",
                     "target ratio 1.3x diffusers: 1.25, missed", "target 24 GB mode peak <= 21 GiB: 21.5 GiB, missed"]
    md = collect.markdown(records, notes, lines)
    assert sum(l.startswith("| ") for l in md.splitlines()) == 1 + 4 and "| train_e2e | NVIDIA H200 | 2.11.0+cu130 | 21.00 | 191.0 |" in md
    # a later call on the same machine measured 24gb again: its last record is kept, in its place
    with open(tmp_path / "records.jsonl", "a") as f:
        f.write(json.dumps(dict(small, peak_gib=20.0)) + "\n")
    records, notes = collect.collect(str(tmp_path), str(run))
    assert [r["mode"] for r in records[1:]] == ["default_compiled", "24gb", "diffusers_compiled"]
    assert records[2]["peak_gib"] == 20.0 and "24gb: measured again, the last record kept" in notes


def run_script(tmp_path, timeout=900, out="out", **env):
    env = dict(os.environ, GPU_DRY_RUN="1", OUT=str(tmp_path / out), TMPDIR=str(tmp_path), **env)
    start = time.monotonic()
    r = subprocess.run(["bash", "tests/gpu/run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - start


def test_dry_run_writes_valid_results(tmp_path):
    out = tmp_path / "out"
    r, _ = run_script(tmp_path, GPU_RESULTS_REPO=str(tmp_path / "repo"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    # the plan, in run order (the default order is the priority), and the three targets inside the budget
    plan = next(l for l in lines if l.startswith("plan: ")).split()[1:]
    caps = dict(item.split("=") for item in plan)
    assert list(caps) == STAGES, plan
    budget = int(next(l for l in lines if l.startswith("budget: ")).split()[1])
    assert sum(int(caps[s]) for s in ("compiled", "24gb", "train_e2e")) <= budget, (plan, budget)
    assert not any("more than the budget" in l for l in lines)
    assert any(l.startswith("python ") and "bitsandbytes" in l for l in lines)  # run.txt on stdout
    assert any("inductor cache" in l for l in lines)
    ran = [l.split()[1].rstrip(":") for l in lines if l.startswith("stage ")]
    assert ran == STAGES, lines
    records = json.loads((out / "results.json").read_text())
    modes = [rec["mode"] for rec in records]
    assert modes == ["train_e2e", "train_resume", "default_compiled", "24gb", "diffusers_compiled", "scope_blocks",
                     "default_eager", "sdpa_flash", "sdpa_cudnn", "scope_unet"], r.stdout[-3000:]
    for rec in records:
        assert set(TYPES) - {"ratio_vs_diffusers"} <= set(rec) <= set(TYPES), rec
        for key, value in rec.items():
            assert isinstance(value, TYPES[key]), (key, value)
    assert records[0]["img_s"] > 0 and records[0]["compile_s"] > 0  # steady steps after the first, timed compiles
    assert records[2]["ratio_vs_diffusers"] == pytest.approx(records[2]["img_s"] / records[4]["img_s"])
    assert len(os.listdir(out)) <= 8 and (out / "run.json").exists()  # the device tool returns at most 8 files
    assert (tmp_path / "repo" / "assets" / "gpu" / "results.json").read_text() == (out / "results.json").read_text()
    md = (out / "results.md").read_text()
    assert "export: model.safetensors" in md and "written" in md and "not measured" in md  # CPU: no target judged
    assert "train_resume: 1 log lines, last iter 4, exported" in md


def test_missing_module_stops_at_once(tmp_path):
    """A bitsandbytes that fails to import stops the call in seconds, on stdout, naming it and the wheels to carry."""
    bad = tmp_path / "bad" / "bitsandbytes"
    bad.mkdir(parents=True)
    (bad / "__init__.py").write_text("raise RuntimeError('libbitsandbytes_cuda.so: cannot open shared object file')\n")
    r, seconds = run_script(tmp_path, timeout=120, PYTHONPATH=str(tmp_path / "bad"))
    assert r.returncode != 0 and seconds < 60, (seconds, r.stdout, r.stderr)
    assert "MISSING python module bitsandbytes (RuntimeError" in r.stdout and ".whl folder" in r.stdout, r.stdout
    assert "plan:" not in r.stdout


def test_stage_order_failures_and_budget(tmp_path):
    """STAGES sets the order; a stage that fails prints why (its last log lines); stages past the budget are skipped;
    an unknown stage name stops the call before anything runs."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "records.jsonl").mkdir()  # bench.py's --record check fails: one line, exit 2
    r, _ = run_script(tmp_path, STAGES="24gb")
    lines = r.stdout.splitlines()
    assert "plan: 24gb=65" in lines and not any("more than the budget" in l for l in lines)
    stages = [l for l in lines if l.startswith("stage ")]
    assert len(stages) == 1 and stages[0].startswith("stage 24gb: exit 2 (a user error"), lines
    tail = [l for l in lines if l.startswith("  24gb| ")]  # the failed stage's last log lines
    assert tail[-1].startswith("  24gb| cannot write to ") and "(--record)" in tail[-1], lines
    # a warm machine's earlier call left a record: it stays in this call's results
    keep = tmp_path / "keep"
    keep.mkdir()
    earlier = {"mode": "24gb", "side": "ours", "device": "cpu", "torch": "2", "img_s": 1.0, "ms_step": 1.0, "mfu": None,
               "peak_gib": None, "compile_s": 1.0, "command": "python bench.py", "git_sha": "abc"}
    (keep / "records.jsonl").write_text(json.dumps(earlier) + "\n")
    r, _ = run_script(tmp_path, out="out2", STAGES="default_eager compiled", BUDGET="20", GPU_KEEP=str(keep))
    lines = r.stdout.splitlines()
    assert "plan: the target stages" in r.stdout  # compiled's cap is past a 20 s budget
    assert [l.split(":")[0] for l in lines if l.startswith("stage ")] == ["stage default_eager", "stage compiled"]
    assert all("skipped" in l for l in lines if l.startswith("stage ")), lines
    assert "kept from this machine's earlier calls: 1 records" in lines
    assert [rec["mode"] for rec in json.loads((tmp_path / "out2" / "results.json").read_text())] == ["24gb"]
    r, seconds = run_script(tmp_path, STAGES="compiled bogus")
    assert r.returncode == 2 and "unknown stage bogus" in r.stdout and seconds < 5
