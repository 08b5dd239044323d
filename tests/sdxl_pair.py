"""
Two full-size SDXL single files with random weights, for timing transfer.py at full size (docs/transfer.md §3):
OUT/eps.safetensors (fp16, model.init_random_'s scales) and OUT/vpred/ (the same with every UNet tensor moved by
1% of its spread, exported as train.py exports: v_pred / ztsnr markers, metadata, diffusers/, README.md). Every
tensor is drawn from its own seed when it is written, so nothing is held whole (well under 1 GB of RAM).

    python tests/sdxl_pair.py --out=/tmp/pair
"""
import math
import os
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import checkpoint  # noqa: E402
import configurator  # noqa: E402
import export  # noqa: E402
import model  # noqa: E402

# -----------------------------------------------------------------------------
out = "/tmp/pair"  # folder for eps.safetensors and vpred/
move = 0.01  # how far the 'uptrain' moves each UNet tensor, as a fraction of its spread
# -----------------------------------------------------------------------------


def random_tensor(name, shape):
    """init_random_'s draw for one tensor, from a seed of its own (so it can be drawn again, in any order)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if name.endswith("logit_scale"):
        return torch.full(shape, math.log(1 / 0.07))
    if len(shape) <= 1:
        return torch.randn(shape, generator=g) * 0.1 + (1.0 if name.endswith("weight") else 0.0)
    if "embedding" in name:
        return torch.randn(shape, generator=g) * 0.5
    fan_in = shape[0] if name.endswith("text_projection") else math.prod(shape[1:])
    return torch.randn(shape, generator=g) * fan_in ** -0.5


def main():
    configurator.configure(globals())
    cfg = model.SDXLConfig()
    with torch.device("meta"):
        shapes = {k: tuple(t.shape) for k, t in model.SDXL(cfg).state_dict().items()}
    unet = checkpoint.PREFIX["unet"]

    def moved(k, s):
        w = random_tensor(k, s)
        if not k.startswith(unet):
            return w
        g = torch.Generator().manual_seed(zlib.crc32(k.encode()) + 1)
        return w + move * w.std().clamp_min(1e-3) * torch.randn(s, generator=g)

    eps = {k: checkpoint.Lazy(s, torch.float16, lambda k=k, s=s: random_tensor(k, s)) for k, s in shapes.items()}
    checkpoint.save_state(eps, cfg, os.path.join(out, "eps.safetensors"), v_pred=False, ztsnr=False,
                          dtype=torch.float16)
    vpred = {k: checkpoint.Lazy(s, torch.float16, lambda k=k, s=s: moved(k, s)) for k, s in shapes.items()}
    recipe = {"prediction": "v", "beta_start": 0.00085, "beta_end": 0.024, "zsnr": True, "weighting": "sigmoid",
              "k": 5.0, "base": "eps.safetensors", "note": f"random weights, UNet moved by {move} of each spread"}
    export.write_export(os.path.join(out, "vpred"), vpred, recipe, cfg=cfg, dtype=torch.float16)


if __name__ == "__main__":
    main()
