"""
Bad input and faults, as a new user or a full disk would produce them. A user error is one line on stderr with
exit status 2 and no traceback, found before any heavy work where the config alone shows it; nothing the user
already has is changed; a run that did not train says so with a non-zero status and exports nothing.
"""
import fcntl
import importlib.util
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, script="train.py", env=None, preexec_fn=None):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=None if env is None else {**os.environ, **env}, preexec_fn=preexec_fn)


def one_line(r, *needles, code=2):
    """The process failed with `code` and said why in exactly one stderr line, no traceback."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == code and len(lines) == 1 and "Traceback" not in r.stdout + r.stderr, \
        f"rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A dataset, vocabulary, start checkpoint and cache made by train.py itself, and a finished 1-step run."""
    d = tmp_path_factory.mktemp("reliable")
    common = ["config/tiny.py", f"--dataset_dir={d}/images", f"--tokenizer={d}/tokenizer", f"--cache_dir={d}/cache",
              f"--init_from={d}/start.safetensors", "--make_synthetic=12", "--eval_items=2", "--log_interval=1",
              "--eval_interval=0", "--ckpt_interval=0"]
    r = run(*common, f"--out_dir={d}/done", "--max_iters=1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return d, common


def test_config_errors_are_one_line_before_any_work(tiny, tmp_path):
    d, common = tiny
    fresh = [a for a in common if not a.startswith(("--dataset_dir", "--init_from", "--tokenizer"))]
    # a dataset, vocabulary and start checkpoint that do not exist yet: the demo would make them, so any of them
    # on disk afterwards means work was done before the error
    fresh += [f"--dataset_dir={tmp_path}/images", f"--tokenizer={tmp_path}/tok", f"--init_from={tmp_path}/start.safetensors"]
    cases = {"--weighting=foo": "--weighting='foo' is not one of sigmoid", "--batch_size=0": "--batch_size=0",
             "--caption_dropout=1.5": "--caption_dropout", "--k=1e999": "--k=inf", "--prediction=x0": "--prediction",
             "--optimizer=sgd": "--optimizer", "--precision=fp8": "--precision", "--dtype=fp8": "--dtype",
             "--crop=left": "--crop", "--export_dtype=int8": "--export_dtype", "--lr_schedule=step": "--lr_schedule",
             "--device=cuda:7": "--device", "--grad_accum=0": "--grad_accum", "--log_interval=0": "--log_interval",
             "--eval_interval=5 --eval_items=0": "--eval_items", "--resolution=16": "--resolution",
             "--beta_end=0.0001": "--beta_end", "--max_iters=0": "--max_iters", "--lr=-1": "--lr",
             "--bucket_step=12": "bucket_step", "--batchsize=2": "did you mean --batch_size",
             "--seed=-1": "--seed=-1", "--compile_mode=fast": "--compile_mode", "--lr=nan": "--lr=nan must be a finite",
             "--synthetic_sizes=(1,2)": "--synthetic_sizes"}
    if importlib.util.find_spec("wandb") is None:
        cases["--wandb_log=True"] = "needs the wandb package"
    for args, needle in cases.items():
        r = run(*fresh, f"--out_dir={tmp_path}/out", *args.split())
        one_line(r, needle)
        assert os.listdir(tmp_path) == [], (args, os.listdir(tmp_path))
    # a config file that raises is the user's Python, reported where it failed
    (tmp_path / "bad.py").write_text("batch_size = 2\nlr = undefined_name\n")
    one_line(run(str(tmp_path / "bad.py"), *fresh[1:], f"--out_dir={tmp_path}/out"), "bad.py line 2: NameError")
    # divisibility the model needs, known from the start checkpoint's header before anything is loaded
    r = run(*common, f"--out_dir={tmp_path}/out2", "--bucket_step=48")
    one_line(r, "--bucket_step=48 must be a multiple of 32")
    assert not (tmp_path / "out2").exists()
    # folders that cannot be written, and a cache among the images: found before the model is loaded
    (tmp_path / "a_file").write_text("")
    one_line(run(*common, f"--out_dir={tmp_path}/a_file"), "cannot write to", "(--out_dir)")
    r = run(*common, f"--out_dir={tmp_path}/out3", f"--cache_dir={tmp_path}/a_file")
    one_line(r, "cannot write to", "(--cache_dir)")
    images = snapshot(d / "images")
    one_line(run(*common, f"--out_dir={tmp_path}/out4", f"--cache_dir={d}/images"), "is the dataset folder")
    assert snapshot(d / "images") == images
    one_line(run(*fresh, f"--out_dir={tmp_path}/out5", f"--cache_dir={tmp_path}/images/"), "is the dataset folder")
    assert not (tmp_path / "out5").exists()


def test_resume_errors_are_one_line(tiny, tmp_path):
    d, common = tiny
    one_line(run(*common, f"--out_dir={tmp_path}/none", "--init_from=resume"), "no", "ckpt.pt to resume from")
    done = snapshot(d / "done")
    # a resume that would change the data order stops before the cache is built
    r = run(*common, f"--out_dir={d}/done", "--init_from=resume", "--max_iters=3", "--batch_size=2")
    one_line(r, "global batch 4", "global batch 2")
    assert "cache latents" not in r.stdout
    one_line(run(*common, f"--out_dir={d}/done", "--init_from=resume", "--max_iters=1"), "at iter 1 already")
    assert snapshot(d / "done") == done
    # a damaged ckpt.pt and a planted pickle that would run code: refused, the payload never runs
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "ckpt.pt").write_bytes(done["ckpt.pt"][:4096])
    one_line(run(*common, f"--out_dir={tmp_path}/cut", "--init_from=resume", "--max_iters=3"), "cannot resume")

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "pwned"),))
    (tmp_path / "evil").mkdir()
    torch.save({"base": Payload(), "iter_num": 0, "skipped": 0}, tmp_path / "evil" / "ckpt.pt")
    one_line(run(*common, f"--out_dir={tmp_path}/evil", "--init_from=resume", "--max_iters=3"), "cannot resume")
    assert not (tmp_path / "pwned").exists()


def test_hub_and_tokenizer_errors_are_one_line(tiny, tmp_path):
    d, common = tiny
    args = [*common, f"--out_dir={tmp_path}/out"]
    one_line(run(*args, "--init_from=hf:no-file-part"), "hf:OWNER/NAME/FILE")
    r = run(*args, "--init_from=hf:nobody-here/nothing/x.safetensors", env={"HF_HUB_OFFLINE": "1"})
    one_line(r, "cannot fetch hf:nobody-here/nothing/x.safetensors")
    one_line(run(*args, "--make_synthetic=0", f"--tokenizer={tmp_path}/missing"), "no vocab.json + merges.txt")
    one_line(run(*args, f"--dataset_dir={tmp_path}/missing", "--make_synthetic=0"), "is not a folder")


def test_a_run_is_never_overwritten_and_one_run_per_folder(tiny):
    d, common = tiny
    done = snapshot(d / "done")
    one_line(run(*common, f"--out_dir={d}/done", "--max_iters=2"), "holds a run already", "--init_from=resume")
    assert snapshot(d / "done") == done
    with open(d / "done" / ".lock", "a+") as f:  # another process holds the folder
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.seek(0)
        f.truncate()
        f.write("pid 4242 on elsewhere\n")
        f.flush()
        one_line(run(*common, f"--out_dir={d}/done", "--init_from=resume", "--max_iters=2"), "in use", "pid 4242")
    assert {k: v for k, v in snapshot(d / "done").items() if k != ".lock"} == \
        {k: v for k, v in done.items() if k != ".lock"}


def test_full_disk_names_the_file_and_keeps_the_last_checkpoint(tiny, tmp_path):
    d, common = tiny
    out = tmp_path / "run"
    r = run(*common, f"--out_dir={out}", "--max_iters=1")
    assert r.returncode == 0, r.stderr[-2000:]
    before = snapshot(out)
    limit = len(before["ckpt.pt"]) // 2  # every other file of the run is smaller: only ckpt.pt cannot be written

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    r = run(*common, f"--out_dir={out}", "--init_from=resume", "--max_iters=2", preexec_fn=small_disk)
    one_line(r, "no space left writing", "ckpt.pt", "GiB")
    after = snapshot(out)
    assert after["ckpt.pt"] == before["ckpt.pt"], "the previous checkpoint changed"
    assert not [k for k in after if k.endswith(".tmp")], "temp files left behind"


def test_signal_before_the_first_step_stops_at_once(tiny, tmp_path):
    d, common = tiny
    p = subprocess.Popen([sys.executable, "-u", "train.py", *common, f"--out_dir={tmp_path}/sig", "--max_iters=50"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("global batch"):  # setup has begun; the model and the data are not loaded yet
            p.send_signal(signal.SIGINT)
            break
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGINT and "Traceback" not in out + err, out + err
    assert "before the first step" in out and not (tmp_path / "sig" / "ckpt.pt").exists()


def test_a_run_that_trains_nothing_fails_and_exports_nothing(tiny, tmp_path):
    d, common = tiny
    r = run(*common, f"--out_dir={tmp_path}/nan", "--max_iters=2", "--debug_nan_at=0")
    assert r.returncode == 1 and "no optimizer step succeeded" in r.stderr, r.stderr[-2000:]
    assert "loss 0.00000" not in r.stdout and "loss - (every step skipped)" in r.stdout
    assert not (tmp_path / "nan" / "model.safetensors").exists()


def _png(path, h, w):
    Image.new("RGB", (w, h), (200, 30, 30)).save(path)


def test_small_images_are_upscaled_down_to_min_pixels(tmp_path, capsys):
    buckets = data.make_buckets(area=128 * 128, step=32)
    _png(tmp_path / "a.png", 120, 120)  # every 1000x1000 image at resolution 1024: smaller than its bucket
    _png(tmp_path / "b.png", 40, 40)
    _png(tmp_path / "c.png", 16, 16)
    items = data.scan_dataset(str(tmp_path), buckets, min_pixels=32 * 32)
    out = capsys.readouterr().out
    assert [it.rel for it in items] == ["a.png", "b.png"] and "2 upscaled to their bucket" in out
    assert "skip c.png: too small" in out
    assert data.load_image(items[1]).shape == (3, *items[1].bucket)


def test_metadata_lines_that_are_not_captions(tmp_path, capsys):
    for name in ("a", "b", "c", "d", "e", "f"):
        _png(tmp_path / f"{name}.png", 64, 64)
    (tmp_path / "e.txt").write_text("from the txt")
    lines = [b'{"file_name": "a.png", "text": null}', b'["file_name", "b.png"]', b'{"file_name": "b.png", "te\xff"}',
             b'{"file_name": "c.png", "caption": "a red square"}', b'{"file_name": "d.png", "prompt": ["red", "square"]}',
             b'{"file_name": "e.png", "tags": "x"}', b'{"file_name": "f.png", "text": {"nested": 1}}', b'42']
    (tmp_path / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    items = data.scan_dataset(str(tmp_path), data.make_buckets(64 * 64, 32))
    out = capsys.readouterr().out
    assert {it.rel: it.caption for it in items} == {"a.png": "", "b.png": "", "c.png": "a red square",
                                                   "d.png": "red, square", "e.png": "from the txt", "f.png": ""}
    for n in (1, 2, 3, 6, 7, 8):
        assert sum(line.startswith(f"metadata.jsonl line {n}:") for line in out.splitlines()) == 1, (n, out)


def test_symlinked_folders_are_followed_once(tmp_path):
    (tmp_path / "real").mkdir()
    _png(tmp_path / "real" / "x.png", 64, 64)
    (tmp_path / "ds").mkdir()
    _png(tmp_path / "ds" / "y.png", 64, 64)
    os.symlink(tmp_path / "real", tmp_path / "ds" / "linked")
    os.symlink(tmp_path / "ds", tmp_path / "ds" / "loop")  # a loop back to the root
    items = data.scan_dataset(str(tmp_path / "ds"), data.make_buckets(64 * 64, 32), quiet=True)
    assert [it.rel for it in items] == [os.path.join("linked", "x.png"), "y.png"]


def test_duplicates_never_straddle_the_eval_split(tmp_path):
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 255, 0)), ("c", (0, 0, 255))):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{name}.png")
    (tmp_path / "z_copy_of_a.png").write_bytes((tmp_path / "a.png").read_bytes())
    items = data.scan_dataset(str(tmp_path), data.make_buckets(64 * 64, 32), quiet=True)
    held, train = data.split_eval(items, 1, quiet=True)
    assert [it.rel for it in held] == ["a.png"] and [it.rel for it in train] == ["b.png", "c.png"]


def test_sample_ablation_and_bench_check_their_input(tiny, tmp_path):
    d, _ = tiny
    ckpt = f"--ckpt={d}/done/model.safetensors"
    sa = lambda *a: run(ckpt, f"--out={tmp_path}/g.png", *a, script="sample_ablation.py")
    one_line(sa(f"--prompts={tmp_path}/prompts.txt"), "prompts file", "not found")
    (tmp_path / "empty.txt").write_text("\n  \n")
    one_line(sa(f"--prompts={tmp_path}/empty.txt"), "holds no prompt")
    # out-of-range steps are caught before the (here missing) checkpoint is even looked at
    one_line(run("--ckpt=/nonexistent.safetensors", "--steps=0", script="sample_ablation.py"), "--steps=0")
    one_line(run("--ckpt=/nonexistent.safetensors", script="sample_ablation.py"), "checkpoint not found")
    one_line(sa("--panels=[(0.012, False, 'x0')]"), "panel")
    one_line(sa("--panels=[]"), "--panels is empty")
    (tmp_path / "a_file").write_text("")
    one_line(sa(f"--out={tmp_path}/a_file/g.png"), "cannot write to", "(--out)")  # before any sampling
    one_line(run("config/tiny.py", "--precision=fp8", script="bench.py"), "--precision")
    one_line(run("config/tiny.py", "--resolution=100", script="bench.py"), "multiples of 32")
    assert not os.path.exists(tmp_path / "g.png")
