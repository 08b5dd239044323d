"""
Test-only oracles for model.py: diffusers / transformers models built from an SDXLConfig, randomised, and their
weights mapped to the sgm single-file layout by a reverse of diffusers' converters, written here from the rename
table in docs/sdxl_format.md §2 (diffusers ships only sgm -> diffusers). check_roundtrip() proves the
reverse mapping by running diffusers' own convert_ldm_* / convert_open_clip_checkpoint on its output.

Nothing here is imported by a runtime file: diffusers and transformers are test dependencies.
"""
import re

import torch

import model

# -----------------------------------------------------------------------------
# oracle configs (written from the spec, independently of export.write_diffusers_config)

def unet_kwargs(u: model.UNetConfig):
    assert u.transformer_depth_middle == u.transformer_depth[-1], "diffusers' mid block uses the last level's depth"
    attn = [d > 0 for d in u.transformer_depth]
    return dict(
        sample_size=32, in_channels=u.in_channels, out_channels=u.out_channels, layers_per_block=u.num_res_blocks,
        block_out_channels=[u.model_channels * m for m in u.channel_mult],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        attention_head_dim=[max(1, u.model_channels * m // 64) for m in u.channel_mult],  # head COUNTS
        transformer_layers_per_block=[max(1, d) for d in u.transformer_depth],
        cross_attention_dim=u.context_dim, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=u.adm_in_channels)


def vae_kwargs(v: model.VAEConfig):
    n = len(v.ch_mult)
    return dict(in_channels=v.in_channels, out_channels=v.in_channels, latent_channels=v.z_channels,
                block_out_channels=[v.ch * m for m in v.ch_mult], layers_per_block=v.num_res_blocks,
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                scaling_factor=model.VAE_SCALE)


def clip_config(t: model.TextConfig):
    from transformers import CLIPTextConfig
    # eos_token_id=2: transformers pools at argmax(ids) (the legacy rule, = open_clip's), as SDXL's configs do
    return CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                          num_hidden_layers=t.layers, num_attention_heads=t.width // 64,
                          max_position_embeddings=t.n_ctx, hidden_act=t.act, layer_norm_eps=1e-5,
                          projection_dim=t.proj_dim or t.width, bos_token_id=0, eos_token_id=2, pad_token_id=1)


@torch.no_grad()
def randomize_(module, seed):
    """Every parameter random and non-trivial: matrices N(0, 1/fan_in), norm gains 1 + N(0, .1), biases N(0, .1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim <= 1:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
    return module


def build_oracles(cfg: model.SDXLConfig, seed=0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    oracles = dict(unet=UNet2DConditionModel(**unet_kwargs(cfg.unet)), vae=AutoencoderKL(**vae_kwargs(cfg.vae)),
                   te1=CLIPTextModel(clip_config(cfg.te1)), te2=CLIPTextModelWithProjection(clip_config(cfg.te2)))
    for i, m in enumerate(oracles.values()):
        randomize_(m, seed + i).eval()
    return oracles

# -----------------------------------------------------------------------------
# diffusers / transformers -> sgm (the reverse of diffusers.loaders.single_file_utils)

RESNET_RENAMES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                  ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def unet_to_sgm(sd, u: model.UNetConfig):
    n, L, out = u.num_res_blocks + 1, len(u.channel_mult), {}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for k, v in sd.items():
        head, _, leaf = k.rpartition(".")
        if head in fixed:
            out[f"{fixed[head]}.{leaf}"] = v
            continue
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", k)
        if m:
            side, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv -> input_blocks.{n(i+1)}.0.op
                new = f"input_blocks.{n * (i + 1)}.0.{rest.replace('conv.', 'op.')}"
            elif kind == "upsamplers":  # after the ResBlock (and the transformer where the level has one)
                has_attn = u.transformer_depth[L - 1 - i] > 0
                new = f"output_blocks.{n * i + n - 1}.{2 if has_attn else 1}.{rest}"
            else:
                idx = f"input_blocks.{n * i + j + 1}" if side == "down" else f"output_blocks.{n * i + j}"
                new = f"{idx}.{0 if kind == 'resnets' else 1}.{rest}"
        else:
            m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)
            assert m, f"unmapped diffusers key {k}"
            new = f"middle_block.{ {'resnets.0': 0, 'attentions.0': 1, 'resnets.1': 2}[f'{m[1]}.{m[2]}'] }.{m[3]}"
            kind = m[1]
        if kind == "resnets":
            for a, b in RESNET_RENAMES:
                new = new.replace(f".{a}.", f".{b}.")
        out[new] = v
    return out


def vae_to_sgm(sd, v: model.VAEConfig):
    n, out = len(v.ch_mult), {}
    for k, t in sd.items():
        new = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        # decoder up_blocks run deepest first: up_blocks.i is sgm's up.{n-1-i}
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.", new)
        new = new.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]:
                new = new.replace(f".{a}.", f".{b}.")
            if t.ndim == 2:  # diffusers Linear [C, C] -> sgm 1x1 conv [C, C, 1, 1]
                t = t[:, :, None, None]
        out[new] = t
    return out


def clip_l_to_sgm(sd):
    # transformers >= 5.6 CLIPTextModel has no `text_model.` level; the file keeps transformers' old names
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def clip_g_to_sgm(sd, logit_scale=2.6592):
    out = {"logit_scale": torch.tensor(logit_scale)}
    layers = {}
    for k, v in sd.items():
        if k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()  # transformers Linear keeps W.T; open_clip does x @ W
            continue
        k = k.removeprefix("text_model.")
        m = re.match(r"encoder\.layers\.(\d+)\.(.*)", k)
        if not m:
            out[{"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}[k]] = v
            continue
        i, rest = m[1], m[2]
        pm = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if pm:  # q, k, v are fused into in_proj_{weight,bias} below
            layers.setdefault((i, pm[2]), {})[pm[1]] = v
            continue
        for a, b in [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                     ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]:
            rest = rest.replace(a, b)
        out[f"transformer.resblocks.{i}.{rest}"] = v
    for (i, kind), qkv in layers.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out


def sgm_state_dict(oracles, cfg: model.SDXLConfig):
    """The whole single-file checkpoint (sgm names, with prefixes) for the oracles' weights."""
    P = model.PREFIX
    parts = dict(unet=unet_to_sgm(oracles["unet"].state_dict(), cfg.unet),
                 vae=vae_to_sgm(oracles["vae"].state_dict(), cfg.vae),
                 te1=clip_l_to_sgm(oracles["te1"].state_dict()), te2=clip_g_to_sgm(oracles["te2"].state_dict()))
    sd = {P[part] + k: v.detach().clone().contiguous() for part, d in parts.items() for k, v in d.items()}
    sd[P["te1"] + "embeddings.position_ids"] = torch.arange(cfg.te1.n_ctx)[None]
    return sd


def check_roundtrip(sd, oracles, cfg: model.SDXLConfig):
    """Run diffusers' own sgm -> diffusers converters on `sd` and require the oracles' exact state dicts back."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    got = dict(unet=convert_ldm_unet_checkpoint(sd, unet_kwargs(cfg.unet)),
               vae=convert_ldm_vae_checkpoint(sd, vae_kwargs(cfg.vae)),
               te1={k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(sd).items()
                    if not k.endswith("position_ids")},
               te2=convert_open_clip_checkpoint(oracles["te2"], sd, prefix=model.PREFIX["te2"]))
    for name, d in got.items():
        ref = oracles[name].state_dict()
        assert d.keys() == ref.keys(), (name, sorted(d.keys() ^ ref.keys())[:5])
        bad = [k for k in ref if d[k].shape != ref[k].shape or not torch.equal(d[k], ref[k])]
        assert not bad, (name, bad[:5])
