"""train.py end to end on the tiny config: exact resume, NaN skip, SIGTERM, DDP, schedules, export."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = 0.05


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Shared tiny dataset, vocabulary, start checkpoint and cache, made by train.py itself (one step)."""
    d = tmp_path_factory.mktemp("tiny")
    # grad_clip well under the tiny model's grad norms (1 to 3): every step is clipped, so exact resume, the skip
    # and DDP are checked with the clip factor applied inside AdamW8bit's kernels
    common = [f"--dataset_dir={d}/images", f"--tokenizer={d}/tokenizer", f"--init_from={d}/start.safetensors",
              f"--cache_dir={d}/cache", "--make_synthetic=24", "--eval_items=4", "--log_interval=1",
              "--eval_interval=0", "--ckpt_interval=0", f"--grad_clip={CLIP}"]
    run(d / "setup", common, "--max_iters=1")
    return d, common


def run(out, common, *args, check=True, cmd=None):
    cmd = cmd or [sys.executable, "train.py"]
    r = subprocess.run([*cmd, "config/tiny.py", f"--out_dir={out}", *common, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"train.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)  # no pickled objects


def test_resume_is_bit_exact_and_schedules_reach_optimizer(assets):
    d, common = assets
    # the straight run also draws preview grids: they must not disturb the training RNG
    r = run(d / "straight", common, "--max_iters=5", "--eval_interval=5", "--sample_interval=3", "--sample_steps=2")
    assert (d / "straight" / "samples" / "iter_000003.png").stat().st_size > 1000
    gnorms = [float(line.split("gnorm ")[1].split(",")[0]) for line in r.stdout.splitlines() if line.startswith("iter ")]
    assert len(gnorms) == 5 and min(gnorms) > 2 * CLIP, gnorms  # every step clipped
    run(d / "split", common, "--max_iters=2")
    os.replace(d / "split" / "ckpt.pt", d / "two_steps.pt")  # kept for the NaN test
    os.link(d / "two_steps.pt", d / "split" / "ckpt.pt")
    r = run(d / "split", common, "--max_iters=5", "--init_from=resume", "--eval_interval=5")
    assert "resumed from" in r.stdout and "at iter 2" in r.stdout
    a, b = ckpt(d / "straight"), ckpt(d / "split")
    assert a["iter_num"] == b["iter_num"] == 5
    for k in a["unet"]:
        assert torch.equal(a["unet"][k], b["unet"][k]), k
    with open(d / "straight" / "model.safetensors", "rb") as f1, open(d / "split" / "model.safetensors", "rb") as f2:
        assert f1.read() == f2.read(), "exported files differ"
    assert a["per_rank"][0]["loader"]["position"] == b["per_rank"][0]["loader"]["position"]
    # the weights moved, and the lr/betas of the last step (iter 4) are what the optimizer holds
    start = checkpoint.load_checkpoint(str(d / "start.safetensors"))
    assert any(not torch.equal(v, start.unet.state_dict()[k]) for k, v in a["unet"].items())
    cfg = a["config"]
    lr4 = cfg["lr"] if 4 >= cfg["warmup_iters"] else None
    r = min(1.0, 4 / cfg["ramp_iters"])
    betas4 = (cfg["beta1"] + r * (cfg["beta1_final"] - cfg["beta1"]), cfg["beta2"] + r * (cfg["beta2_final"] - cfg["beta2"]))
    for g in a["optimizer"]["param_groups"]:
        assert g["lr"] == pytest.approx(lr4 if lr4 is not None else cfg["lr"] * 5 / (cfg["warmup_iters"] + 1))
        assert g["betas"] == pytest.approx(betas4)
    # two steps in: warmup lr 3e-4 * 2/6 and betas one ramp step further than at iter 0
    two = torch.load(d / "two_steps.pt", map_location="cpu", weights_only=True)
    g = two["optimizer"]["param_groups"][0]
    assert g["lr"] == pytest.approx(cfg["lr"] * 2 / (cfg["warmup_iters"] + 1))
    assert g["betas"][0] == pytest.approx(cfg["beta1"] + (1 / cfg["ramp_iters"]) * (cfg["beta1_final"] - cfg["beta1"]))
    # the eval log: 10 finite per-bin values at iter 5
    rows = [json.loads(line) for line in open(d / "straight" / "eval.jsonl")]
    assert rows[-1]["iter"] == 5 and len(rows[-1]["mse_bins"]) == 10
    assert all(v == v and v < 1e3 for v in rows[-1]["mse_bins"])


def test_export_loads_in_diffusers(assets):
    d, common = assets
    out = d / "straight"
    if not (out / "model.safetensors").exists():
        run(out, common, "--max_iters=5")
    sd = load_file(str(out / "model.safetensors"))
    assert "v_pred" in sd and "ztsnr" in sd and sd["v_pred"].numel() == 0
    ours = checkpoint.load_checkpoint(str(out / "model.safetensors"))
    assert ours.v_pred and ours.ztsnr
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionXLPipeline.from_single_file(
        str(out / "model.safetensors"), config=str(out / "diffusers"), local_files_only=True)
    sc = pipe.scheduler.config
    assert sc.prediction_type == "v_prediction" and sc.beta_end == pytest.approx(0.024)
    assert sc.rescale_betas_zero_snr and sc.timestep_spacing == "trailing"
    # the model card train.py wrote beside it, as huggingface_hub parses it (its text: tests/test_card.py)
    from huggingface_hub import ModelCard
    from test_card import SETTINGS, UIS
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "start.safetensors" and "v-prediction" in card.data.tags
    assert all(text in card.text for text in SETTINGS + UIS), [t for t in SETTINGS + UIS if t not in card.text]
    g = torch.Generator().manual_seed(0)
    cu = ours.cfg.unet
    x = torch.randn(2, 4, 16, 12, generator=g)
    t = torch.tensor([999, 300])
    ctx = torch.randn(2, 77, cu.context_dim, generator=g)
    pooled = torch.randn(2, ours.cfg.te2.proj_dim, generator=g)
    time_ids = torch.tensor([[128.0, 96, 0, 0, 128, 96]] * 2)
    with torch.no_grad():
        a = ours.unet(x, t, ctx, model.build_y(pooled, time_ids))
        b = pipe.unet(x, t, encoder_hidden_states=ctx,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert (a - b).abs().max() / b.abs().max() < 1e-4
    # and the tokenizer folder travels with it
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77).input_ids
    assert ids[0][0] == pipe.tokenizer.bos_token_id


def test_nan_loss_skips_step_without_touching_state(assets):
    d, common = assets
    if not (d / "two_steps.pt").exists():
        run(d / "two", common, "--max_iters=2")
        os.replace(d / "two" / "ckpt.pt", d / "two_steps.pt")
    r = run(d / "nan", common, "--max_iters=3", "--debug_nan_at=2")
    assert "iter 2: non-finite loss" in r.stdout and "skipped 1" in r.stdout
    two, nan = torch.load(d / "two_steps.pt", map_location="cpu", weights_only=True), ckpt(d / "nan")
    assert nan["skipped"] == 1 and nan["iter_num"] == 3
    for k in two["unet"]:
        assert torch.equal(two["unet"][k], nan["unet"][k]), k
    state = lambda sd: {k: v for k, v in sd.items() if k != "param_groups"}  # moments, step count, SR generator
    assert same(state(two["optimizer"]), state(nan["optimizer"]))


def same(a, b):
    """Deep equality of nested dicts/lists of tensors and plain values."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_sigterm_writes_checkpoint_then_resumes(assets):
    d, common = assets
    out = d / "term"
    p = subprocess.Popen([sys.executable, "-u", "train.py", "config/tiny.py", f"--out_dir={out}", *common,
                          "--max_iters=100000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("iter 2:"):
            p.send_signal(signal.SIGTERM)
            break
    rest, _ = p.communicate(timeout=300)
    assert p.returncode == 128 + signal.SIGTERM, "".join(lines) + rest  # stopped, not finished: says so
    assert "got signal" in rest and "saved" in rest
    c = ckpt(out)
    assert c["iter_num"] >= 2 and not (out / "model.safetensors").exists()
    r = run(out, common, "--init_from=resume", f"--max_iters={c['iter_num'] + 1}")
    assert f"resumed from {out}/ckpt.pt at iter {c['iter_num']}" in r.stdout
    assert ckpt(out)["iter_num"] == c["iter_num"] + 1


def test_ddp_update_equals_single_process(assets):
    d, common = assets
    args = ["--max_iters=2", "--optimizer=adamw", "--caption_dropout=0.5"]
    run(d / "single", common, *args, "--batch_size=4")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    # 2 processes x micro-batch 2 x (grad_accum 2 / 2 processes) = a global batch of 4, as above
    run(d / "ddp", common, *args, "--batch_size=2", "--grad_accum=2", cmd=torchrun)
    start = checkpoint.load_checkpoint(str(d / "start.safetensors")).unet.state_dict()
    a, b = ckpt(d / "single"), ckpt(d / "ddp")
    num = den = 0.0
    for k, w0 in start.items():
        da, db = a["unet"][k] - w0, b["unet"][k] - w0
        num += (da - db).pow(2).sum().item()
        den += da.pow(2).sum().item()
    assert den > 0
    assert (num / den) ** 0.5 < 1e-3, f"relative difference of the updates {(num / den) ** 0.5:.2e}"
    assert len(b["per_rank"]) == 2


def test_bad_start_checkpoint_is_one_clear_line(assets, tmp_path):
    d, common = assets
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes((d / "start.safetensors").read_bytes()[:5000])
    r = run(tmp_path / "out", [a for a in common if not a.startswith("--init_from")], f"--init_from={bad}", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"cannot load {bad}")
    # a checkpoint whose optimizer state is not this optimizer's: one line, the checkpoint left as it was
    if not (d / "two_steps.pt").exists():
        run(d / "two", common, "--max_iters=2")
        os.replace(d / "two" / "ckpt.pt", d / "two_steps.pt")
    (tmp_path / "res").mkdir()
    os.link(d / "two_steps.pt", tmp_path / "res" / "ckpt.pt")
    before = (tmp_path / "res" / "ckpt.pt").read_bytes()
    r = run(tmp_path / "res", common, "--init_from=resume", "--optimizer=adamw", "--max_iters=3", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("cannot resume the adamw optimizer")
    assert (tmp_path / "res" / "ckpt.pt").read_bytes() == before
    r = run(tmp_path / "out", common, "--batchsize=2", check=False)
    assert r.returncode != 0 and r.stderr.strip() == "config error: unknown config key 'batchsize'; did you mean --batch_size?"


def test_compiled_run_warms_every_bucket_past_dynamo_limit(tmp_path):
    # 9 buckets (> Dynamo's default 8 graphs per function, where fullgraph=True turns the 9th bucket into
    # FailOnRecompileLimitHit mid-run; SDXL's 1024^2 buckets are 13): each compiles once before step 1, none
    # during the loop, and the warm-up leaves the run equal to the eager one (Dynamo's eager backend: the
    # tracing and recompile logic without Inductor's minutes of codegen)
    sizes = "((288, 672), (320, 608), (352, 544), (384, 512), (416, 480), (448, 448), (480, 416), (512, 384), " \
            "(544, 352), (608, 320), (672, 288))"
    common = [f"--dataset_dir={tmp_path}/images", f"--tokenizer={tmp_path}/tokenizer", f"--cache_dir={tmp_path}/cache",
              f"--init_from={tmp_path}/start.safetensors", "--make_synthetic=22", f"--synthetic_sizes={sizes}",
              "--resolution=448", "--batch_size=1", "--eval_items=1", "--eval_interval=0", "--ckpt_interval=0",
              "--max_iters=3"]
    run(tmp_path / "eager", common)
    env = dict(os.environ, TORCH_LOGS="recompiles")
    r = subprocess.run([sys.executable, "train.py", "config/tiny.py", f"--out_dir={tmp_path}/compiled", *common,
                        "--compile=True", "--debug_compile_backend=eager", "--compile_mode=max-autotune-no-cudagraphs"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # compile_mode reaches the compiler (Dynamo's eager backend says it ignores it) and is recorded with the run
    assert "ignoring extra kwargs {'mode': 'max-autotune-no-cudagraphs'}" in r.stderr
    assert json.load(open(tmp_path / "compiled" / "run.json"))["config"]["compile_mode"] == "max-autotune-no-cudagraphs"
    n = int(next(l for l in r.stdout.splitlines() if l.startswith("compiled ") and "buckets in" in l).split()[1])
    assert n >= 9 and r.stdout.count("compiled bucket ") == n
    assert r.stderr.count("Recompiling function forward") == n - 1, "a bucket compiled twice, or inside the loop"
    a, b = ckpt(tmp_path / "eager"), ckpt(tmp_path / "compiled")
    assert all(torch.equal(a["unet"][k], b["unet"][k]) for k in a["unet"])
    # regional compilation: each ResBlock / TransformerBlock compiled on its own, the same weights as eager; the
    # time to the first step is printed and recorded
    r = run(tmp_path / "blocks", common, "--compile=True", "--debug_compile_backend=eager", "--compile_scope=blocks")
    c = ckpt(tmp_path / "blocks")
    assert all(torch.equal(a["unet"][k], c["unet"][k]) for k in a["unet"])
    ready = [l for l in r.stdout.splitlines() if l.startswith("ready in ")]
    assert len(ready) == 1 and re.fullmatch(r"ready in [\d.]+ s: load [\d.]+ s, cache [\d.]+ s, compile [\d.]+ s, "
                                            r"other [\d.]+ s", ready[0]), ready
    rec = json.load(open(tmp_path / "blocks" / "run.json"))["ready"]
    assert set(rec) == {"load_s", "cache_s", "compile_s", "other_s", "ready_s"} and rec["compile_s"] > 0


def test_long_prompts_and_tensorboard(assets, tmp_path):
    """--max_token_length=225 trains on 231-position contexts (3 whole 77-position chunks, cached as such),
    previews and records the setting in the export; --tensorboard_log writes the scalars and the preview grids."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    d, common = assets
    common = [a for a in common if not a.startswith("--cache_dir")] + [f"--cache_dir={tmp_path}/cache"]
    out = tmp_path / "long"
    run(out, common, "--max_iters=2", "--max_token_length=225", "--sample_interval=2", "--sample_steps=2",
        "--eval_interval=2", "--tensorboard_log=True")
    texts = sorted((tmp_path / "cache" / "text").rglob("*.safetensors"))
    assert texts and all(load_file(p)["context"].shape[0] == 231 for p in texts)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["training_config"])["max_token_length"] == 225
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/img_s", "eval/mse_bin9"} <= set(tags["scalars"]), tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert "preview" in tags["images"]
