"""
Turns one tests/gpu/run.sh call's outputs into results.json (a list of records, every value read from a bench.py
--record line or a train.py log, none typed by hand) and results.md (the same as a markdown table, with the
targets of bench.py judged met or missed), and prints the table and the targets.

    python tests/gpu/collect.py OUT [--train_dir=DIR] [--assets=DIR]

OUT holds records.jsonl (bench.py --record), train.log and resume.log (train.py's output, the command on the
first line after `$ `) and run.json (the train run's device, torch and git sha); --train_dir is the train run's
out_dir (the export, and run.json when OUT has none); --assets also writes results.json and results.md there.
A records line that cannot be read (cut by a kill mid-write) is skipped with a note; a mode recorded twice (a later
call on the same machine measured it again) keeps its last record.
"""
import json
import os
import re
import statistics
import sys

KEYS = ("mode", "device", "torch", "img_s", "ms_step", "mfu", "peak_gib", "compile_s", "ratio_vs_diffusers",
        "command", "git_sha")  # ratio_vs_diffusers only where diffusers timed the same step
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ITER = re.compile(r"^iter (\d+): loss .*?, ([\d.]+) img/s, (\d+) ms/it, mfu ([\d.]+%|-), mem ([\d.]+GiB|-),")
BUCKET = re.compile(r"^compiled bucket (\d+x\d+): ([\d.]+) s")
WARM = re.compile(r"^compiled (\d+) buckets in ([\d.]+) s")
READY = re.compile(r"^ready in .*")


def targets():
    """bench.py's target constants, read from its source (importing it would run a bench)."""
    src = open(os.path.join(ROOT, "bench.py")).read()
    return {k: float(re.search(rf"^{k} = ([\d.]+)", src, re.M).group(1))
            for k in ("TARGET_IMGS_PER_S", "TARGET_RATIO", "TARGET_24GB_GIB")}


def parse_train_log(text):
    """The numbers of one train.py run: its command, the iter lines, per-bucket and total compile seconds."""
    lines = text.splitlines()
    command = next((l[2:] for l in lines if l.startswith("$ ")), "")
    iters = []
    for l in lines:
        m = ITER.match(l)
        if m:
            iters.append({"iter": int(m[1]), "img_s": float(m[2]), "ms_it": float(m[3]),
                          "mfu": float(m[4][:-1]) if m[4] != "-" else None,
                          "mem_gib": float(m[5][:-3]) if m[5] != "-" else None})
    buckets = {m[1]: float(m[2]) for m in map(BUCKET.match, lines) if m}
    warm = [float(m[2]) for m in map(WARM.match, lines) if m]
    ready = [l for l in lines if READY.match(l)]
    return {"command": command, "iters": iters, "buckets": buckets,
            "compile_s": warm[0] if warm else (sum(buckets.values()) if buckets else None),
            "ready": ready[0] if ready else None, "exported": any(l.startswith("exported ") for l in lines)}


def train_record(mode, log, run):
    """A results record from a parsed train.py log: img/s, ms/step and MFU are medians over the log lines after the
    first (the first interval holds the first step; a median also ignores one interval that held a pause, such as
    a checkpoint write in a log from before train.py left those out), peak memory the largest printed."""
    steady = log["iters"][1:]
    median = lambda key: statistics.median(x[key] for x in steady) if steady and steady[0][key] is not None else None
    mems = [x["mem_gib"] for x in log["iters"] if x["mem_gib"] is not None]
    return {"mode": mode, "device": run.get("device", "unknown"), "torch": run.get("torch", "unknown"),
            "img_s": median("img_s"), "ms_step": median("ms_it"), "mfu": median("mfu"), "peak_gib": max(mems, default=None),
            "compile_s": log["compile_s"], "command": log["command"], "git_sha": run.get("git_sha", "unknown")}


SAME_STEP = ("device", "torch", "compiled", "compile_mode", "sdpa", "precision", "grad_ckpt", "batch_size",
             "resolution", "params", "git_sha")  # an ours and a diffusers record that timed the same step


def bench_records(lines):
    """(records, notes) from bench.py --record lines (their other fields are dropped). A line that is not a whole
    record is skipped with a note. ratio_vs_diffusers is computed here, on an ours record from the last diffusers
    record of the same step (SAME_STEP): bench.py writes each side's line as soon as that side is measured, and a
    GPU call may time the two sides in two processes, so neither line can hold the ratio."""
    raws, notes = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError:  # cut mid-line
            raw = None
        missing = ([k for k in KEYS if k != "ratio_vs_diffusers" and k not in raw] if isinstance(raw, dict)
                   else ["whole JSON object"])
        if missing:
            notes.append(f"records.jsonl line {n} skipped (damaged: no {', '.join(missing)}): {line.strip()[:80]}")
            continue
        raws.append(raw)
    step = lambda r: tuple(r.get(k) for k in SAME_STEP)
    theirs = {step(r): r for r in raws if r.get("side") == "diffusers" and r["img_s"]}
    out = []
    for raw in raws:
        rec = {k: raw[k] for k in KEYS if k in raw}
        if raw.get("side") == "ours" and step(raw) in theirs:
            rec["ratio_vs_diffusers"] = raw["img_s"] / theirs[step(raw)]["img_s"]
        out.append(rec)
    return out, notes


def collect(out, train_dir=""):
    """(records, notes) from one run.sh call's folder."""
    run = {}
    for folder in (out, train_dir):
        if folder and os.path.isfile(os.path.join(folder, "run.json")):
            run = json.load(open(os.path.join(folder, "run.json")))
            break
    records, notes = [], []
    for mode, name in (("train_e2e", "train.log"), ("train_resume", "resume.log")):
        path = os.path.join(out, name)
        if not os.path.isfile(path):
            continue
        log = parse_train_log(open(path, errors="replace").read())
        if log["iters"]:
            records.append(train_record(mode, log, run))
        if log["ready"]:
            notes.append(f"{mode}: {log['ready']}")
        if log["buckets"]:
            per_bucket = ", ".join(f"{b} {s:.1f} s" for b, s in log["buckets"].items())
            notes.append(f"{mode}: compile per bucket {per_bucket}")
        last = log["iters"][-1]["iter"] if log["iters"] else "-"
        notes.append(f"{mode}: {len(log['iters'])} log lines, last iter {last}, "
                     f"{'exported' if log['exported'] else 'not exported'}")
    path = os.path.join(out, "records.jsonl")
    if os.path.isfile(path):
        bench, bad = bench_records(open(path, errors="replace").readlines())
        records += bench
        notes += bad
    by_mode = {}  # the last record of each mode, in the order the modes first came
    for r in records:
        if r["mode"] in by_mode:
            notes.append(f"{r['mode']}: measured again, the last record kept")
        by_mode[r["mode"]] = r
    records = list(by_mode.values())
    if train_dir:
        f = os.path.join(train_dir, "model.safetensors")
        exported = os.path.exists(f) and os.path.isdir(os.path.join(train_dir, "diffusers"))
        notes.append(f"export: model.safetensors {os.path.getsize(f) / 1e9:.2f} GB and diffusers/ written" if exported
                     else "export: missing")
    return records, notes


def verdicts(records, t):
    """The targets, judged on CUDA records only (peak memory present): met, missed, or not measured."""
    by_mode = {r["mode"]: r for r in records if r.get("peak_gib") is not None}
    judge = lambda ok: "met" if ok else "missed"
    out = []
    r = by_mode.get("default_compiled")
    out.append(f"target {t['TARGET_IMGS_PER_S']:g} img/s (default mode, compiled, batch 4, 1024^2): " +
               (f"{r['img_s']:.2f} img/s, {judge(r['img_s'] >= t['TARGET_IMGS_PER_S'])}" if r else "not measured"))
    ratio = r.get("ratio_vs_diffusers") if r else None
    out.append(f"target ratio {t['TARGET_RATIO']:g}x diffusers: " +
               (f"{ratio:.2f}, {judge(ratio >= t['TARGET_RATIO'])}" if ratio is not None else "not measured"))
    r = by_mode.get("24gb")
    out.append(f"target 24 GB mode peak <= {t['TARGET_24GB_GIB']:g} GiB: " +
               (f"{r['peak_gib']:.1f} GiB, {judge(r['peak_gib'] <= t['TARGET_24GB_GIB'])}" if r else "not measured"))
    return out


def markdown(records, notes, verdict_lines):
    cell = lambda v, fmt: "-" if v is None else format(v, fmt)
    rows = ["| mode | device | torch | img/s | ms/step | MFU % | peak GiB | compile / first step s "
            "| ratio vs diffusers | command | git |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        rows.append(f"| {r['mode']} | {r['device']} | {r['torch']} | {cell(r['img_s'], '.2f')} | "
                    f"{cell(r['ms_step'], '.1f')} | {cell(r['mfu'], '.1f')} | {cell(r['peak_gib'], '.1f')} | "
                    f"{cell(r['compile_s'], '.1f')} | {cell(r.get('ratio_vs_diffusers'), '.2f')} | "
                    f"`{r['command']}` | {r['git_sha'][:10]} |")
    return "\n".join(rows + [""] + [f"- {n}" for n in notes + verdict_lines]) + "\n"


def write(folder, records, md):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(md)


def main(argv):
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
    out = next(a for a in argv if not a.startswith("--"))
    records, notes = collect(out, opts.get("train_dir", ""))
    sha = os.environ.get("GIT_SHA", "")  # the device copy of the repo may have no .git: the caller's HEAD
    for r in records:
        if r["git_sha"] == "unknown" and sha:
            r["git_sha"] = sha
    lines = verdicts(records, targets())
    md = markdown(records, notes, lines)
    for folder in (out, opts.get("assets")):
        if folder:
            write(folder, records, md)
    print(md)


if __name__ == "__main__":
    main(sys.argv[1:])
