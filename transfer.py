"""
The v-conversion as a portable file (docs/transfer.md): the weight change of an uptrain, D = W_vpred - W_eps (UNet
only), extracted once, and added with no training to another epsilon fine-tune of the same base. Whether D carries
"predict v on the new schedule" over to a given fine-tune is measured (sample_ablation.py on the result), not
assumed.

    python transfer.py --mode=extract --eps=EPS.safetensors --vpred=VPRED.safetensors --out=DELTA.safetensors
    python transfer.py --mode=extract --eps=EPS.safetensors --vpred=VPRED.safetensors --out=LORA.safetensors --rank=32
    python transfer.py --mode=apply --base=BASE.safetensors --delta=DELTA.safetensors --out=OUT/model.safetensors
    python transfer.py --help                                                         # every key

extract writes a kohya/ComfyUI-format file, keys `lora_unet_<sgm module path, dots as _>` (the names kohya's
sd-scripts gives SDXL modules, which ComfyUI, A1111 and diffusers' SDXL loader map back): --rank=0 the full
delta as `.diff` (weights) and `.diff_b` (biases); --rank=R a LoRA, each weight matrix D (a convolution reshaped to
[out, in * kh * kw]) replaced by its best rank-R approximation up @ down from the SVD, `lora_down` [R, in(, kh, kw)],
`lora_up` [out, R(, 1, 1)], `alpha` = R (a scale of 1), norms and biases as `.diff` / `.diff_b` or left out (--norms).
apply adds either file to an SDXL single file at --strength and writes it as a trained export is written
(export.write_export): the v_pred / ztsnr markers, metadata, diffusers/ and the model card beside it.

One tensor (one module) at a time is read, computed and written, so a full-size SDXL pair needs RAM for a few of
its largest tensors, not for the model (docs/transfer.md §3 has the measured time and peak memory).
"""
import os

# before torch starts its thread pool: threads that sleep rather than spin while they wait. LAPACK's SVD with spinning
# OpenMP threads, on 2 cores shared with another job, took 39 s for the tiny model's 204 matrices, 2.7 s with these.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import math
import struct
import time

import torch

import checkpoint
import configurator
import export
import files
import tokenizer as clip_tokenizer
from configurator import UserError, UserFileNotFound

# -----------------------------------------------------------------------------
mode = ""  # extract | apply
eps = ""  # extract: the epsilon model the uptrain started from (an SDXL single file)
vpred = ""  # extract: the v-prediction uptrain of --eps (train.py's model.safetensors)
base = ""  # apply: the SDXL single file to convert (an epsilon fine-tune of the same base)
delta = ""  # apply: a file written by --mode=extract (full delta or LoRA)
out = ""  # the .safetensors file to write; apply writes diffusers/ and README.md beside it
rank = 0  # extract: 0 = the full delta; R > 0 = a LoRA of rank R per weight matrix (SVD)
norms = "diff"  # extract, rank > 0: norms and biases as .diff / .diff_b (ComfyUI, A1111 read them; diffusers refuses them) | none
exact_svd = False  # extract, rank > 0: True = LAPACK's SVD of each matrix (slow for SDXL); False = seeded randomized SVD
strength = 1.0  # apply: the multiple of the delta that is added
dtype = "auto"  # auto = extract: full delta one float wider than the inputs (exact), LoRA fp16; apply: the base's | fp16 | bf16 | fp32 | fp64
tokenizer = "hf:stabilityai/stable-diffusion-xl-base-1.0"  # apply: vocab.json + merges.txt folder or hf:REPO for diffusers/; '' = none
beta_start = 0.00085  # the uptrain's schedule, recorded when --vpred's metadata does not hold it
beta_end = 0.024  # (as above)
zsnr = True  # (as above)
overwrite = False  # replace an existing --out (apply: and the README.md and diffusers/ beside it)
# -----------------------------------------------------------------------------
_UNET = checkpoint.PREFIX["unet"]
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
_WIDER = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float64,
         torch.float64: torch.float64}
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".diff_b", ".diff")
_OVERSAMPLE, _POWER_ITERS = 16, 4  # randomized SVD (Halko et al. 2011): extra columns, power iterations


class Reader:
    """Tensors of a safetensors file read with pread, one at a time: nothing is memory-mapped, so the process
    holds only the tensors in use (a mapped file counts every page it has touched in the process's memory)."""
    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            self.header = json.loads(f.read(n))
        self.metadata = self.header.pop("__metadata__", None) or {}
        self.start = 8 + n
        self.fd = os.open(path, os.O_RDONLY)

    def shape(self, key):
        return tuple(self.header[key]["shape"])

    def dtype(self, key):
        return checkpoint.ST_DTYPES[self.header[key]["dtype"]]

    def get(self, key):
        a, b = self.header[key]["data_offsets"]
        buf = bytearray(b - a)
        view, done = memoryview(buf), 0
        while done < len(buf):  # pread may return less than asked
            done += os.preadv(self.fd, [view[done:]], self.start + a + done)
        return torch.frombuffer(buf, dtype=self.dtype(key)).reshape(self.shape(key)) if buf else \
            torch.empty(self.shape(key), dtype=self.dtype(key))

    def close(self):
        os.close(self.fd)


def lora_name(key):
    """'model.diffusion_model.input_blocks.4.1.proj_in.weight' -> 'lora_unet_input_blocks_4_1_proj_in': kohya's
    name of the module (its path with dots as _), which ComfyUI maps back by building it from every weight key."""
    return "lora_unet_" + key[len(_UNET):].rsplit(".", 1)[0].replace(".", "_")


def factors(d, r, exact=False):
    """d [out, in(, kh, kw)] -> (up [out, r(, 1, 1)], down [r, in(, kh, kw)]), up @ down the best rank-r approximation
    of d as a matrix [out, in * kh * kw] (Eckart-Young), the shapes kohya gives a convolution's LoRA. sqrt(S) goes
    to each side, so neither factor holds the whole scale in fp16."""
    m = d.reshape(d.shape[0], -1).double()
    q = min(r + _OVERSAMPLE, *m.shape)
    if exact or q == min(m.shape):
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    else:  # the same random start for every matrix, so a run writes the same bytes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            U, S, V = torch.svd_lowrank(m.float(), q=q, niter=_POWER_ITERS)
        U, S, Vh = U.double(), S.double(), V.double().T
    s = S[:r].sqrt()
    up = (U[:, :r] * s).reshape(d.shape[0], r, *[1] * (d.ndim - 2))
    down = (s[:, None] * Vh[:r]).reshape(r, *d.shape[1:])
    return up, down


def lora_delta(up, down, alpha, shape):
    """The weight change a LoRA module stands for: (alpha / r) up @ down, in fp64, as ComfyUI computes it."""
    r = down.shape[0]
    return (alpha / r) * (up.reshape(up.shape[0], r).double() @ down.reshape(r, -1).double()).reshape(shape)

# -----------------------------------------------------------------------------
# the checks: every mistake the arguments and the files' headers show, before any tensor is read


def _input(path, key):
    if not path:
        raise UserError(f"config error: --mode={mode} needs --{key}=FILE.safetensors")
    if not os.path.isfile(path):
        raise UserFileNotFound(f"--{key}={path}: no such file")
    return path


def read_layout(path):
    """The header of an SDXL single file, checked like load_checkpoint checks it, with nothing loaded: (config,
    {key: shape} of the model's keys, {key: torch dtype} as stored, metadata, {'v_pred': bool, 'ztsnr': bool})."""
    with checkpoint.open_file(path) as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {k: checkpoint.ST_DTYPES[f.get_slice(k).get_dtype()] for k in f.keys()}
        metadata = f.metadata() or {}
    sdxl = checkpoint.meta_model(path, shapes)
    keys = {k: shapes[k] for k in sdxl.state_dict()}
    return sdxl.cfg, keys, {k: dtypes[k] for k in keys}, metadata, {m: m in shapes for m in ("v_pred", "ztsnr")}


def _layout(path, key):
    try:
        return read_layout(path)
    except checkpoint.CheckpointError as e:
        raise UserError(f"--{key}: {e}") from None


def _check_out(inputs, extra=()):
    """--out: a .safetensors path that is none of the inputs, and nothing there unless --overwrite."""
    if not out or not out.endswith(".safetensors"):
        raise UserError(f"config error: --out={out!r} must name the .safetensors file to write")
    for key, path in inputs.items():
        if os.path.realpath(out) == os.path.realpath(path):
            raise UserError(f"--out={out} is the --{key} file: write the result to another file")
    there = [p for p in (out, *extra) if os.path.exists(p)]
    if there and not overwrite:
        raise UserError(f"{', '.join(there)} already exist{'s' if len(there) == 1 else ''}: pick another --out, "
                        f"or --overwrite=True to replace {'it' if len(there) == 1 else 'them'}")
    files.make_dir(os.path.dirname(os.path.abspath(out)), "out")


def _schedule(meta):
    """The uptrain's recipe from its export's metadata, or the schedule keys when the file does not record it."""
    if "training_config" in meta:
        return json.loads(meta["training_config"])
    ns = json.loads(meta["noise_schedule"]) if "noise_schedule" in meta else {}
    recipe = {"prediction": "v", "beta_start": ns.get("beta_start", beta_start),
              "beta_end": ns.get("beta_end", beta_end), "zsnr": ns.get("zsnr", zsnr)}
    print(f"note: --vpred records no training_config; the schedule recorded is {recipe}")
    return recipe

# -----------------------------------------------------------------------------


def _check_pair():
    """The eps and v-pred files: both SDXL single files of one size, the markers the right way round."""
    _input(eps, "eps"), _input(vpred, "vpred")
    _check_out({"eps": eps, "vpred": vpred})
    _, keys_e, dtypes_e, _, markers_e = _layout(eps, "eps")
    _, keys_v, dtypes_v, meta_v, markers_v = _layout(vpred, "vpred")
    unet = sorted(k for k in keys_v if k.startswith(_UNET))
    bad = [f"{k} {keys_e[k]} vs {keys_v[k]}" for k in unet if keys_e[k] != keys_v[k]]
    if bad:
        raise UserError(f"--eps and --vpred are different SDXL sizes: {len(bad)} UNet tensors differ in shape "
                        f"(eps vs vpred), e.g. {'; '.join(bad[:3])}")
    if markers_e["v_pred"] and not markers_v["v_pred"]:
        raise UserError(f"--eps={eps} carries the v_pred marker and --vpred={vpred} does not: swapped?")
    if markers_e["v_pred"]:
        raise UserError(f"--eps={eps} carries the v_pred marker: extract needs the epsilon model the uptrain "
                        f"started from")
    if not markers_v["v_pred"]:
        print(f"note: --vpred={vpred} has no v_pred marker; extracting all the same")
    return unet, keys_v, dtypes_e, dtypes_v, meta_v


def _metadata(kind, out_dtype, recipe, meta_v, alpha):
    """What the delta file says it is: modelspec, kohya's network keys for a LoRA, and what it needs to sample."""
    about = {"kind": "delta" if rank == 0 else "lora", "rank": rank, "norms": "diff" if rank == 0 else norms,
             "eps": os.path.basename(eps), "vpred": os.path.basename(vpred), "dtype": str(out_dtype)[6:],
             "svd": "exact" if exact_svd else f"randomized ({_OVERSAMPLE} extra columns, {_POWER_ITERS} power "
                                               f"iterations) where smaller than the matrix, else exact",
             "needs": "v-prediction sampling with zero terminal SNR (trailing spacing, CFG rescale 0.7): the model "
                      "it is added to must be sampled as v, which transfer.py --mode=apply marks in the file"}
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.title": os.path.splitext(os.path.basename(out))[0], "modelspec.prediction_type": "v",
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "modelspec.description": f"The v-prediction conversion of {about['vpred']}: its UNet weight change from "
                                     f"{about['eps']} ({kind}). A model it is added to must be sampled with "
                                     f"v-prediction and zero terminal SNR.",
            "ss_base_model_version": "sdxl_base_v1-0", "vpred_transfer": json.dumps(about),
            "training_config": json.dumps(recipe), "noise_schedule": meta_v.get("noise_schedule") or json.dumps(
                {k: recipe[k] for k in ("beta_start", "beta_end", "zsnr")})}
    if rank > 0:
        meta.update({"ss_network_module": "networks.lora", "ss_network_dim": f"{alpha:g}", "ss_network_alpha": f"{alpha:g}"})
    return meta


def extract():
    unet, keys_v, dtypes_e, dtypes_v, meta_v = _check_pair()
    recipe = _schedule(meta_v)
    widest = max((d[k] for d in (dtypes_e, dtypes_v) for k in unet), key=lambda t: torch.finfo(t).bits)
    out_dtype = _DTYPES[dtype] if dtype != "auto" else _WIDER[widest] if rank == 0 else torch.float16
    kind = "full delta" if rank == 0 else \
        f"LoRA rank {rank}, norms and biases {'as .diff' if norms == 'diff' else 'left out'}"
    print(f"extract {kind}: {len(unet)} UNet tensors of {vpred} minus {eps} -> {out} ({str(out_dtype)[6:]})")

    ranks = {k: min(rank, keys_v[k][0], math.prod(keys_v[k][1:])) for k in unet if rank and len(keys_v[k]) >= 2}
    # one alpha for every module, the largest rank in the file, and up scaled by r / alpha where a matrix is too
    # small for the rank asked: diffusers' loader (0.42.1) gives attention modules whose alpha differs from the
    # file's most common one the wrong scale (2x, measured on the tiny model's 64-wide layers)
    alpha = float(max(ranks.values(), default=0))
    r_eps, r_v = Reader(eps), Reader(vpred)
    stats = {"total": 0.0, "kept": 0.0, "matrix": 0.0, "matrix_kept": 0.0, "n_svd": 0}
    cache = {}

    def diff(k):
        d = r_v.get(k).double() - r_eps.get(k).double()  # exact: two floats of at most 32 bits differ exactly in 64
        stats["total"] += d.pow(2).sum().item()
        stats["kept"] += d.pow(2).sum().item()
        return d

    def factor(k, which):
        if cache.get("key") != k:  # down is written first (sorted keys), up right after: one module in RAM
            d = r_v.get(k).double() - r_eps.get(k).double()
            up, down = factors(d, ranks[k], exact_svd)
            up = up * (ranks[k] / alpha)
            e, res = d.pow(2).sum().item(), (d - lora_delta(up, down, alpha, d.shape)).pow(2).sum().item()
            stats["total"] += e
            stats["kept"] += e - res
            stats["matrix"] += e
            stats["matrix_kept"] += e - res
            stats["n_svd"] += 1
            cache.clear()
            cache.update(key=k, up=up, down=down)
        return cache[which]

    tensors, left_out = {}, []
    for k in unet:
        name, shape = lora_name(k), keys_v[k]
        if rank == 0 or len(shape) < 2:
            if rank > 0 and norms == "none":  # counted in the total, so the share kept says what was lost
                left_out.append(k)
                stats["total"] += (r_v.get(k).double() - r_eps.get(k).double()).pow(2).sum().item()
                continue
            suffix = ".diff_b" if k.endswith(".bias") else ".diff"
            tensors[name + suffix] = checkpoint.Lazy(shape, out_dtype, lambda k=k: diff(k))
        else:
            r = ranks[k]
            tensors[name + ".lora_down.weight"] = checkpoint.Lazy((r, *shape[1:]), out_dtype,
                                                                  lambda k=k: factor(k, "down"))
            tensors[name + ".lora_up.weight"] = checkpoint.Lazy((shape[0], r, *[1] * (len(shape) - 2)), out_dtype,
                                                                lambda k=k: factor(k, "up"))
            tensors[name + ".alpha"] = torch.tensor(alpha)
    meta = _metadata(kind, out_dtype, recipe, meta_v, alpha)
    t0 = time.time()
    try:
        checkpoint.write_safetensors(tensors, out, meta)
    finally:
        r_eps.close(), r_v.close()
    share = stats["kept"] / stats["total"] if stats["total"] else 1.0
    print(f"wrote {out} ({os.path.getsize(out) / 2**30:.3f} GiB) in {time.time() - t0:.1f} s: {len(tensors)} tensors, "
          f"{100 * share:.2f}% of the delta's sum of squares kept")
    if rank > 0:
        m = stats["matrix_kept"] / stats["matrix"] if stats["matrix"] else 1.0
        print(f"  {stats['n_svd']} weight matrices at rank <= {rank}: {100 * m:.2f}% of their sum of squares; norm "
              f"and bias tensors {f'left out ({len(left_out)})' if left_out else 'kept whole (.diff, .diff_b)'}")
    return stats


def read_delta(path, keys):
    """The delta file's modules checked against the base's UNet keys from the headers alone:
    {base key: ('diff', name) | ('lora', name)}, the file's metadata."""
    try:
        r = Reader(path)
    except (OSError, ValueError, struct.error) as e:
        raise UserError(f"--delta={path}: not a readable safetensors file ({type(e).__name__})") from None
    r.close()
    by_name = {lora_name(k): k for k in keys if k.startswith(_UNET)}  # kohya's name -> a key, as ComfyUI maps it
    plan, bad = {}, []
    for key in r.header:
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        name = key[:-len(suffix)] if suffix else key
        target = by_name.get(name)
        if suffix is None or target is None:
            bad.append(key)
            continue
        weight, bias = target.rsplit(".", 1)[0] + ".weight", target.rsplit(".", 1)[0] + ".bias"
        if suffix == ".diff_b":
            ok = keys.get(bias) == r.shape(key)
            plan[bias] = ("diff", key)
        elif suffix == ".diff":
            ok = keys[weight] == r.shape(key)
            plan[weight] = ("diff", key)
        elif suffix == ".lora_down.weight":
            up = name + ".lora_up.weight"
            ok = up in r.header and r.shape(key)[1:] == keys[weight][1:] and r.shape(up)[0] == keys[weight][0] \
                and r.shape(up)[1] == r.shape(key)[0] and math.prod(r.shape(up)[2:]) == 1
            plan[weight] = ("lora", name)
        else:  # lora_up and alpha: their shapes are checked with their lora_down
            ok = name + ".lora_down.weight" in r.header
        if not ok:
            bad.append(f"{key} {r.shape(key)}")
    if bad:
        raise UserError(f"--delta={path}: {len(bad)} keys are not SDXL UNet LoRA / delta keys for this --base (or do "
                        f"not fit its shapes), e.g. {', '.join(sorted(bad)[:3])}")
    if not plan:
        raise UserError(f"--delta={path} holds no UNet key: not a file written by transfer.py --mode=extract")
    return plan, r.metadata


def apply():
    _input(base, "base"), _input(delta, "delta")
    out_dir = os.path.dirname(os.path.abspath(out))
    _check_out({"base": base, "delta": delta}, [os.path.join(out_dir, n) for n in ("README.md", "diffusers")])
    cfg, keys, dtypes, _, markers = _layout(base, "base")
    if markers["v_pred"]:
        raise UserError(f"--base={base} already carries the v_pred marker: the conversion is for epsilon models")
    plan, meta_d = read_delta(delta, keys)
    tok_dir = clip_tokenizer.tokenizer_folder(tokenizer) if tokenizer else None
    about = json.loads(meta_d.get("vpred_transfer", "{}"))
    recipe = json.loads(meta_d["training_config"]) if "training_config" in meta_d else _schedule(meta_d)
    out_dtype = dtypes[_UNET + "out.2.weight"] if dtype == "auto" else _DTYPES[dtype]
    kind = about.get("kind", "lora" if any(p[0] == "lora" for p in plan.values()) else "delta")
    conversion = {"base": base, "delta": os.path.basename(delta), "strength": strength,
                  "kind": "full delta" if kind == "delta" else f"LoRA rank {about.get('rank', '?')}",
                  "from": {k: about[k] for k in ("eps", "vpred") if k in about}}
    print(f"apply {conversion['kind']} {delta} x {strength:g} to {base}: {len(plan)} UNet tensors change -> {out} "
          f"({str(out_dtype)[6:]})")

    rb, rd = Reader(base), Reader(delta)

    def changed(k):
        w = rb.get(k).double()
        how, name = plan[k]
        if how == "diff":
            d = rd.get(name).double()
        else:
            down = rd.get(name + ".lora_down.weight")
            alpha = rd.get(name + ".alpha").item() if name + ".alpha" in rd.header else down.shape[0]
            d = lora_delta(rd.get(name + ".lora_up.weight"), down, alpha, w.shape)
        return w + strength * d

    tensors = {k: checkpoint.Lazy(shape, dtypes[k], (lambda k=k: changed(k)) if k in plan else (lambda k=k: rb.get(k)))
               for k, shape in keys.items()}
    t0 = time.time()
    try:
        title = f"{os.path.splitext(os.path.basename(base))[0]} converted to v-prediction"
        export.write_export(out_dir, tensors, recipe, cfg=cfg, dtype=out_dtype, conversion=conversion, title=title,
                            tokenizer_dirs=tok_dir and (tok_dir, tok_dir), model_file=os.path.basename(out))
    finally:
        rb.close(), rd.close()
    print(f"wrote {out} ({os.path.getsize(out) / 2**30:.3f} GiB) in {time.time() - t0:.1f} s")


def main(argv=None):
    configurator.configure(globals(), argv)
    configurator.check(globals(), choices={"mode": ("extract", "apply"), "norms": ("diff", "none"),
                                           "dtype": ("auto", *_DTYPES)},
                       at_least={"rank": 0}, within={"strength": (-math.inf, math.inf), "beta_start": (0, 1),
                                                     "beta_end": (0, 1)})
    if mode == "apply" and dtype == "fp64":
        raise UserError("config error: --dtype=fp64 is for extract's delta; a model is written as fp16, bf16 or fp32")
    if mode == "extract":
        extract()
    else:
        apply()


if __name__ == "__main__":
    main()
