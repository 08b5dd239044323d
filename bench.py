"""
Times the UNet training step alone, nanoGPT bench.py style: cached latents and text embeddings (synthetic
tensors of the real shapes), noise + t, the v target, the per-t loss weight, forward, backward, grad clip and
the optimizer step. Optionally runs the identical step on diffusers' UNet2DConditionModel built with the
equivalent config and the same weights (converted with diffusers' own convert_ldm_unet_checkpoint), checks
once that both give the same forward output, and prints `ratio X.XX` (our images/s over diffusers') last.
On the full UNet at 1024^2 on a GPU, a `target:` line says whether each target (below, docs/performance.md §3) is met.

    python bench.py config/tiny.py --compare=diffusers          # CPU, offline, tiny model (tests/test_bench.py)
    python bench.py config/tiny.py --profile=True                # + torch.profiler trace in out_dir
    # 1 GPU, SDXL base UNet with random weights, 1024^2, batch 4: amp (fp32 master + bf16), compile,
    # channels_last, AdamW8bit -- the targets (>= 20 img/s, >= 1.3x diffusers)
    python bench.py --init_from=random --resolution=1024 --batch_size=4 --compare=diffusers
    # the 24 GB mode: pure bf16 weights + per-block gradient checkpointing, batch 1
    python bench.py --init_from=random --resolution=1024 --batch_size=1 --precision=bf16 --grad_ckpt=True
    # + one JSON line per side appended to a file, named for tests/gpu/collect.py (tests/gpu/run.sh does this)
    python bench.py ... --record=out/records.jsonl --record_as='("default_compiled", "diffusers_compiled")'

Timing: CUDA events on a GPU (one host sync per step, as train.py's: the skip test and the clip factor that
AdamW8bit's kernels apply, fetched together; t, noise and the loss weight are made on the device), wall clock
on CPU; the first step (which compiles) is timed apart from the steady state, then `warmup` untimed steps, then
`rounds` windows of `iters` steps; medians over all timed steps are reported. On CPU both models stay in
memory and the windows alternate (ours, theirs, theirs, ours, ...) so drift and noisy neighbours hit both, and
torch runs one thread (--threads): two OpenMP threads on two shared, busy cores stall at every barrier and
swing step times tenfold. On a GPU two SDXL trainers (weights, grads, optimizer state) do not fit at once, so
they run one after the other; diffusers compiles second and reuses the Inductor kernels the two graphs share,
so its first-step time is the lower bound of a cold compile.
FLOPs: counted once with torch.utils.flop_counter.FlopCounterMode on the meta device at the real shape,
forward + backward, without checkpointing (model FLOPs; recomputation is not credited). MFU is against the
dense bf16 peak of the device (table below, or --peak_tflops).
"""
import dataclasses
import gc
import json
import math
import os
import platform
import shlex
import signal
import statistics
import sys
import time
from contextlib import nullcontext

import torch

import checkpoint
import configurator
import distributed
import export
import model
import objective
import optim
import perf
import schedule
import tokenizer as clip_tokenizer

_t_launch = time.time()  # progress lines say how far into the run they are (a leading _: not a config key)
# -----------------------------------------------------------------------------
# train.py's keys and defaults, read from its source (any training config works here as-is; the keys the step
# does not use are ignored), then the keys whose bench default differs and the bench's own
globals().update(configurator.script_defaults(os.path.join(configurator.REPO, "train.py")))
_config_sources = [os.path.join(configurator.REPO, "train.py")]  # --help shows train.py's comments for its keys
init_from = "random"  # local sgm file | hf:REPO/FILE | 'random' (full-size SDXL base, random weights)
# bench only
model_size = "auto"  # auto (init_from / tiny_size decide) | tiny | full (tiny and full use random weights)
width = 0  # random models: model_channels override (the full topology's 1680 tensors at a CPU size); 0 = as built
compare = ""  # '' | 'diffusers': also time diffusers' UNet2DConditionModel on the identical step
compile_diffusers = True  # False: leave diffusers' UNet eager even with compile=True (saves one compile)
measure = "both"  # with compare: both | ours | diffusers: time only that side (a GPU call times each side in its own
#                   process, under its own time limit; tests/gpu/collect.py pairs the two records for the ratio)
sdpa = ""  # '' = torch's choice | flash | cudnn | efficient | math: allow only that attention backend (CUDA)
channels_last = torch.cuda.is_available()  # channels_last memory format for both UNets (cuDNN convs)
warmup = 3  # untimed steps after the first (compiling) step
iters = 10 if torch.cuda.is_available() else 1  # timed steps per window (CPU: windows alternate step by step)
rounds = 3 if torch.cuda.is_available() else 30  # timing windows per model
threads = 1  # torch threads on CPU, 0 = default (2 OpenMP threads on 2 busy shared cores stall at each barrier)
profile = False  # write a torch.profiler chrome trace of a few steps per model to out_dir
record = ""  # append one JSON line per measured side to this file (tests/gpu/collect.py turns them into results)
record_as = ("", "")  # mode names of (ours, diffusers) in those lines; '' = ours / diffusers
# -----------------------------------------------------------------------------
# the targets (docs/performance.md §3), judged on the full SDXL UNet at 1024^2 on one CUDA GPU (printed as met/missed there)
TARGET_IMGS_PER_S = 20.0  # default mode (fp32 master + bf16, compiled), batch 4: >= 41% MFU on an H100
TARGET_RATIO = 1.3  # ours / diffusers, the identical step with the same compile setting
TARGET_24GB_GIB = 21.0  # 24 GB mode (pure bf16 + per-block checkpointing, batch 1): allocated peak, room left on a 24 GB card


config = configurator.configure(globals())
configurator.check(config, choices={
    "prediction": ("v", "eps"), "weighting": schedule.WEIGHTINGS, "optimizer": optim.OPTIMIZERS,
    "precision": ("amp", "bf16"), "dtype": ("float32", "bfloat16", "float16"), "model_size": ("auto", "tiny", "full"),
    "max_token_length": clip_tokenizer.MAX_TOKEN_LENGTHS, "compare": ("", "diffusers"),
    "measure": ("both", "ours", "diffusers"), "sdpa": ("", "flash", "cudnn", "efficient", "math"),
    "compile_mode": tuple(torch._inductor.list_mode_options()), "compile_scope": distributed.SCOPES}, at_least={
    "resolution": 32, "batch_size": 1, "width": 0, "warmup": 0, "iters": 1, "rounds": 1, "threads": 0,
    "peak_tflops": 0, "lr": 0, "weight_decay": 0, "adam_eps": 0, "grad_clip": 0, "gamma": 0}, within={
    "beta1": (0, 1), "beta2": (0, 1), "beta_start": (0, 1), "beta_end": (beta_start, 1), "k": (-math.inf, math.inf)})
if measure != "both" and not compare:
    raise configurator.UserError(f"config error: --measure={measure} picks a side of --compare=diffusers; add it")
if len(record_as) != 2 or not all(isinstance(x, str) for x in record_as):
    raise configurator.UserError(f"config error: --record_as={record_as!r} must be two names, (ours, diffusers)")
if resolution % 32 or (width and width % 32):  # latents are 1/8, halved twice by the UNet; GroupNorm's 32 groups
    raise configurator.UserError(f"config error: --resolution ({resolution}) and --width ({width}) must be multiples of 32")
configurator.check_device(device)
if record:  # now, not after the measuring: a file that cannot be appended to is one line, not a traceback at the end
    try:
        if not os.path.exists(os.path.dirname(os.path.abspath(record))):
            os.makedirs(os.path.dirname(os.path.abspath(record)))
        open(record, "a").close()
    except OSError as e:
        raise configurator.UserError(f"cannot write to {record} (--record): {e.strerror}; pick another file") from None
if compare:  # before the model is built: a missing diffusers is one line, not a traceback minutes in
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        raise configurator.UserError(f"config error: --compare=diffusers needs the diffusers package ({e}); "
                                     f"pip install diffusers") from None
# -----------------------------------------------------------------------------

device_type = "cuda" if device.startswith("cuda") else "cpu"
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
amp = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)
wdtype = torch.bfloat16 if precision == "bf16" else torch.float32  # weight (and input) dtype
if device_type == "cpu" and threads:
    torch.set_num_threads(threads)
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # one shape for the whole run: let cuDNN pick its conv algorithms
    if sdpa:  # SDPA dispatches at run time, so this holds for compiled graphs too
        for name, on in (("flash", "flash"), ("cudnn", "cudnn"), ("mem_efficient", "efficient"), ("math", "math")):
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(sdpa == on)
torch.manual_seed(seed)
if device_type == "cuda":
    dev_name = torch.cuda.get_device_name(device)
    peak = peak_tflops or perf.peak_tflops(dev_name)
else:
    dev_name, peak = platform.processor() or "cpu", peak_tflops
print(f"device {dev_name}, torch {torch.__version__}, {torch.get_num_threads()} threads, precision {precision}, "
      f"dtype {dtype}, compile {compile} ({compile_mode}), sdpa {sdpa or 'auto'}, channels_last {channels_last}, grad_ckpt {grad_ckpt}, {optimizer}")

# -----------------------------------------------------------------------------
# the model (only the UNet: VAE and text encoders are not part of the step)


def build_unet():
    path = checkpoint.fetch(init_from) if model_size == "auto" and init_from != "random" else init_from
    size = model_size if model_size != "auto" else ("full" if init_from == "random" else "file"
                                                    if os.path.isfile(path) else "tiny" if tiny_size else "missing")
    if size == "missing":
        raise configurator.UserFileNotFound(f"init_from {init_from!r} is not a file: use --init_from=random (full-size "
                                            "SDXL, random weights), --model_size=tiny, or a config with tiny_size=True")
    if size == "file":
        unet = checkpoint.load_checkpoint(path, device="cpu", dtype=torch.float32).unet
    else:
        cfg = model.SDXLConfig.tiny() if size == "tiny" else model.SDXLConfig()
        if width:
            cfg.unet = dataclasses.replace(cfg.unet, model_channels=width)
        with torch.device("meta"):
            unet = model.UNet(cfg.unet)
        unet = model.init_random_(unet.to_empty(device=device), seed=seed)
    print(f"UNet: {size} ({sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M params, "
          f"{len(list(unet.parameters()))} tensors)")
    return unet.to(device)


def build_diffusers(ours):
    """diffusers' UNet with our weights, converted by diffusers' own sgm -> diffusers converter (copies, not views)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from diffusers.utils import logging
    cfg = export.diffusers_unet_config(ours.cfg)
    sgm = {"model.diffusion_model." + k: v.detach().clone() for k, v in ours.state_dict().items()}
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**cfg)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(sgm, cfg), strict=True, assign=True)
    logging.set_verbosity_error()  # its .to(bfloat16) warns about keeping modules in fp32; it has none
    return theirs


@torch.no_grad()
def equivalence(ours, theirs):
    """Relative error between the two forwards on the first bench image, in fp32 (no TF32), before any step."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    b = {k: v[:1] for k, v in batch.items()}
    t = torch.full((1,), T // 2, device=device)
    z = loss_fn.noised(b["latents"], torch.randn_like(b["latents"]), t)
    y = model.build_y(b["pooled"], b["time_ids"])
    a, c = ours(z, t, b["context"], y), call_diffusers(theirs, z, t, b["context"], b["pooled"], b["time_ids"])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return ((a - c).norm() / c.norm()).item()


def call_diffusers(net, z, t, context, pooled, time_ids):
    return net(z, t, encoder_hidden_states=context, return_dict=False,
               added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})[0]


class AsOurs(torch.nn.Module):
    """diffusers' UNet2DConditionModel called as the objective calls ours, net(z, t, context, y). diffusers builds
    y inside its forward from (pooled, time_ids): it gets y's pooled part and the bench batch's size/crop values
    (the same for the whole run), and so pays once more for the few small ops of our y."""

    def __init__(self, net, time_ids):
        super().__init__()
        self.net, self.time_ids, self.config = net, time_ids, net.config

    def forward(self, z, t, context, y):
        return call_diffusers(self.net, z, t, context, y[:, :y.shape[1] - 6 * model.TIME_ID_DIM], self.time_ids)

    def enable_gradient_checkpointing(self):
        self.net.enable_gradient_checkpointing()


def since_launch():
    return f"{time.time() - _t_launch:.0f} s since launch"


def make_optimizer(params):  # as train.py, for both sides
    return optim.configure_optimizer(params, optimizer, lr, (beta1, beta2), adam_eps, weight_decay,
                                    fused=device_type == "cuda", seed=seed)


def make_side(name, net, compiled):
    net.train().requires_grad_(True).to(wdtype)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if grad_ckpt:
        if name == "ours":
            net.grad_ckpt = True
        else:
            net.enable_gradient_checkpointing()
    return {"name": name, "net": net, "compiled": compiled, "opt": None, "fwd": None, "times": []}


def start(side):
    """Optimizer + compile wrapper (built here so that a parked model is on the device first), first step, warm-up."""
    # ours as train.py compiles it (scope, backend, mode; no graph breaks); diffusers' UNet whole, as it comes
    if not side["compiled"]:
        side["fwd"] = side["net"]
    elif side["name"] == "ours":
        side["fwd"] = distributed.compile_unet(side["net"], compile_scope, 1, fullgraph=True,
                                               backend=debug_compile_backend, mode=compile_mode)
    else:
        side["fwd"] = torch.compile(side["net"], backend=debug_compile_backend, mode=compile_mode)
    side["opt"] = make_optimizer([p for p in side["net"].parameters() if p.requires_grad])
    if device_type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step(side, [])
    if device_type == "cuda":
        torch.cuda.synchronize()
    side["first_s"] = time.perf_counter() - t0
    print(f"{side['name']}: first step {side['first_s']:.1f} s{' (compile)' if side['compiled'] else ''}, "
          f"{since_launch()}")
    for _ in range(warmup):
        step(side, [])
    if device_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)

# -----------------------------------------------------------------------------
# one training step, marked at its phase boundaries


abar = schedule.alphas_cumprod(beta_end, zsnr, beta_start).to(device)  # float64, cast at use
T = len(abar)
loss_fn = objective.Objective(abar, prediction, weighting, k, gamma, amp, channels_last)  # train.py's step


def clock():
    if device_type == "cuda":
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e
    return time.perf_counter()


def ms(a, b):
    return a.elapsed_time(b) if device_type == "cuda" else 1e3 * (b - a)


def step(side, marks):
    marks.append(clock())
    t = torch.randint(0, T, (batch_size,), device=device)
    loss, _ = loss_fn(side["fwd"], batch, t, torch.randn_like(batch["latents"]))
    marks.append(clock())
    loss.backward()
    marks.append(clock())
    # as train.py: the norm, the clip, and the skip test fetched with the clip factor (a bench step never skips;
    # the transfer is the cost)
    opt = side["opt"]
    gnorm, coef = optim.clip_factor(opt, side["net"].parameters(), grad_clip if grad_clip > 0 else math.inf)
    _, coef = torch.stack([(torch.isfinite(gnorm) & torch.isfinite(loss)).float(), coef.float()]).tolist()
    marks.append(clock())
    opt.step(gnorm_scale=coef) if isinstance(opt, optim.FlatAdamW8bit) else opt.step()
    opt.zero_grad(set_to_none=True)
    marks.append(clock())


def window(side):
    marks = []
    gc.collect()
    gc.disable()  # no collector pauses inside a timed window
    for _ in range(iters):
        step(side, marks)
    if device_type == "cuda":
        torch.cuda.synchronize()
    gc.enable()
    for i in range(0, len(marks), 5):
        m = marks[i:i + 5]
        side["times"].append([ms(a, b) for a, b in zip(m, m[1:])] + [ms(m[0], m[4])])  # fwd bwd clip opt total


def count_flops(net):
    """Forward + backward FLOPs of one step at the real shape, on the meta device (nothing is allocated)."""
    from torch.utils.flop_counter import FlopCounterMode
    b = {k: torch.empty(v.shape, device="meta") for k, v in batch.items()}  # fp32, as the meta model
    with torch.device("meta"):
        m = model.UNet(net.cfg) if isinstance(net, model.UNet) else AsOurs(type(net.net).from_config(net.config),
                                                                            b["time_ids"])
        t = torch.zeros(batch_size, dtype=torch.long)
        with FlopCounterMode(display=False) as fc:
            y = model.build_y(b["pooled"], b["time_ids"])
            m(b["latents"], t, b["context"], y).float().pow(2).mean().backward()
    return fc.get_total_flops()


def report(side):
    f, bw, c, o, tot = (statistics.median(col) for col in zip(*side["times"]))
    ips = batch_size / (tot / 1e3)
    side["mfu"] = 100 * side["flops"] * ips / (peak * 1e12) if peak else None
    mfu = f"{side['mfu']:.1f}%" if peak else "-"
    side["phases"] = [round(x, 2) for x in (f, bw, c, o, tot)]
    side["mem"] = torch.cuda.max_memory_allocated(device) / 2**30 if device_type == "cuda" else 0.0
    mem = f"{side['mem']:.1f} GiB" if device_type == "cuda" else "-"
    n = len(list(side["net"].parameters()))
    print(f"{side['name']}: {ips:.3f} img/s, {tot:.1f} ms/step (fwd {f:.1f}, bwd {bw:.1f}, clip {c:.1f}, "
          f"opt {o:.1f} ms over {n} tensors), {side['flops'] / 1e12:.4g} TFLOP/img, mfu {mfu}, peak mem {mem}, "
          f"first step {side['first_s']:.1f} s, batch {batch_size} @ {resolution}px, {len(side['times'])} steps")
    return ips


def write_record(s):
    """Appends side s's JSON line to --record as soon as the side is measured (closed, so flushed): a time limit
    or a failure later on (the other side's compile, say) loses nothing measured. The ratio to diffusers is not in
    it: on a GPU ours is written before diffusers runs (or in another process, with --measure); tests/gpu/collect.py
    computes it from the two lines."""
    if not record:
        return
    line = {"mode": record_as[s["name"] == "diffusers"] or s["name"], "side": s["name"], "device": dev_name,
            "device_type": device_type, "torch": torch.__version__, "img_s": s["ips"], "ms_step": s["phases"][-1],
            "ms_fwd_bwd_clip_opt": s["phases"][:4], "mfu": s["mfu"],
            "peak_gib": s["mem"] if device_type == "cuda" else None, "compile_s": s["first_s"],
            "compiled": s["compiled"], "compile_mode": compile_mode, "sdpa": sdpa, "precision": precision,
            "compile_scope": compile_scope if s["name"] == "ours" else "unet",  # diffusers' UNet is compiled whole
            "grad_ckpt": grad_ckpt, "batch_size": batch_size, "resolution": resolution,
            "params": sum(p.numel() for p in s["net"].parameters()),
            "command": "python bench.py " + shlex.join(sys.argv[1:]), "git_sha": SHA}
    with open(record, "a") as f:
        f.write(json.dumps(line) + "\n")


def trace(side):
    from torch.profiler import ProfilerActivity, profile as prof
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with prof(activities=acts) as p:
        for _ in range(min(iters, 3)):
            step(side, [])
        if device_type == "cuda":
            torch.cuda.synchronize()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"bench_trace_{side['name']}.json")
    p.export_chrome_trace(path)
    key = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    print(p.key_averages().table(sort_by=key, row_limit=15))
    print(f"wrote {path}")

# -----------------------------------------------------------------------------
# the run


unet = build_unet()  # fp32 until after the equivalence check
ucfg = unet.cfg
h = w = resolution // 8
assert h % 4 == 0, f"resolution {resolution} must be a multiple of 32 (latents / 4 after two downsamples)"
g = torch.Generator(device="cpu").manual_seed(seed)
batch = {"latents": torch.randn(batch_size, ucfg.in_channels, h, w, generator=g),  # cached (model scale)
         # cat(CLIP-L, bigG) hidden states, 77 positions per chunk of max_token_length (docs/sdxl_format.md §8)
         "context": torch.randn(batch_size, clip_tokenizer.context_positions(max_token_length), ucfg.context_dim,
                                generator=g),
         "pooled": torch.randn(batch_size, ucfg.adm_in_channels - 6 * model.TIME_ID_DIM, generator=g),
         "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch_size).float()}
batch = {k: v.to(device) for k, v in batch.items()}
nets = [("ours", unet, compile)]
if compare:
    theirs = build_diffusers(unet)  # on our device
    err = equivalence(unet, theirs)
    print(f"equivalence: forward rel err {err:.2e} vs diffusers in fp32 (tol 1e-4): {'ok' if err <= 1e-4 else 'FAIL'}")
batch = {k: v.to(wdtype if k != "time_ids" else torch.float32) for k, v in batch.items()}
if channels_last:
    batch["latents"] = batch["latents"].contiguous(memory_format=torch.channels_last)
if compare:
    nets.append(("diffusers", AsOurs(theirs, batch["time_ids"]), compile and compile_diffusers))
sides = [make_side(*n) for n in nets if measure in ("both", n[0])]
SHA = perf.git_sha()
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # a time limit: a clean exit, 143

for s in sides:
    s["flops"] = count_flops(s["net"]) / batch_size
    print(f"{s['name']}: {s['flops']:.6e} FLOP per image (fwd+bwd, counted on meta), {since_launch()}")

alternate = device_type == "cpu"  # both trainers fit in RAM; on a GPU two SDXL trainers (weights+grads+state) do not
if alternate:
    for s in sides:
        start(s)
    for r in range(rounds):
        for s in (sides if r % 2 == 0 else sides[::-1]):
            window(s)
    for s in sides:
        if profile:
            trace(s)
    for s in sides:
        s["ips"] = report(s)
        write_record(s)
else:
    for name, net, _ in nets:
        if name != sides[0]["name"]:
            net.to("cpu")  # parked while the first side runs (with --measure, never brought back)
    for s in sides:
        s["net"].to(device)
        start(s)
        for r in range(rounds):
            window(s)
        if profile:
            trace(s)
        s["ips"] = report(s)
        write_record(s)
        s["net"].to("cpu")
        s["opt"] = s["fwd"] = None  # free the optimizer state (.to("cpu") took weights and grads) before the next side
        if device_type == "cuda":
            torch.cuda.empty_cache()

paired = len(sides) == 2
if device_type == "cuda" and resolution == 1024 and sum(p.numel() for p in unet.parameters()) > 2e9 and \
        sides[0]["name"] == "ours":
    ours, verdict = sides[0], lambda ok: "met" if ok else "missed"
    if precision == "amp" and not grad_ckpt and batch_size == 4:
        print(f"target: {ours['ips']:.2f} img/s >= {TARGET_IMGS_PER_S} (compile {compile}): "
              f"{verdict(ours['ips'] >= TARGET_IMGS_PER_S)}")
        if paired:
            r = ours["ips"] / sides[1]["ips"]
            print(f"target: ratio {r:.2f} >= {TARGET_RATIO}: {verdict(r >= TARGET_RATIO)}")
    if precision == "bf16" and grad_ckpt and batch_size == 1:
        print(f"target: peak {ours['mem']:.1f} GiB <= {TARGET_24GB_GIB}: {verdict(ours['mem'] <= TARGET_24GB_GIB)}")
if paired:
    print(f"ratio {sides[0]['ips'] / sides[1]['ips']:.2f}")
