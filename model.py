"""
SDXL base 1.0 in plain PyTorch: UNet, VAE and the two text encoders, with parameter names that ARE the
names in the single-file sgm checkpoint (`sd_xl_base_1.0.safetensors`).

    sdxl = load_checkpoint("sd_xl_base_1.0.safetensors", device="cuda", dtype=torch.bfloat16)
    context, pooled = sdxl.encode_text(tokens1, tokens2)     # (B, 77, 2048), (B, 1280)
    y = build_y(pooled, time_ids)                             # (B, 2816); time_ids (B, 6) = (h, w, top, left, h, w)
    out = sdxl.unet(z, t, context, y)                         # (B, 4, h, w)
    save_checkpoint(sdxl, "out/model.safetensors", v_pred=True, ztsnr=True)

Because `SDXL().state_dict()` keys are the file's keys, loading and saving are a shape check and a copy, not a
converter (the idea of kohya-ss sd-scripts' sdxl_original_unet.py). Every size is a dataclass field that
load_checkpoint infers from tensor shapes, so the tiny test/demo model runs the very same code.

References: Podell et al. 2023, SDXL (arXiv 2307.01952); Stability-AI/generative-models (sgm):
openaimodel.py (UNet), model.py (VAE), encoders/modules.py; mlfoundations/open_clip transformer.py (bigG);
HF transformers CLIPTextModel (CLIP-L). The traps are collected in ../shared/spec/sdxl_format.md.
"""
import json
import math
import os
import shutil
import struct
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

VAE_SCALE = 0.13025  # SDXL latent scale (no shift): the UNet sees mean * VAE_SCALE; decode z / VAE_SCALE
TIME_ID_DIM = 256    # width of each of the 6 size/crop embeddings in y

# -----------------------------------------------------------------------------
# configs (SDXL base defaults; load_checkpoint infers every field from the file)

@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320              # width of level 0; the time embedding is 4x this
    channel_mult: tuple = (1, 2, 4)        # width of level i = model_channels * channel_mult[i]
    num_res_blocks: int = 2                # ResBlocks per level in the encoder (+1 in the decoder)
    transformer_depth: tuple = (0, 2, 10)  # transformer blocks per level, 0 = no attention at that level
    transformer_depth_middle: int = 10
    context_dim: int = 2048                # te1 width + te2 width
    adm_in_channels: int = 2816            # y = pooled te2 (1280) + 6 * TIME_ID_DIM
    head_dim: int = 64                     # SDXL heads are 64 wide everywhere (heads = C // 64); not in the file
    num_groups: int = 32                   # GroupNorm groups; not in the file


@dataclass
class VAEConfig:
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)  # len(ch_mult) - 1 downsamplings: 4 levels = latents 8x smaller
    num_res_blocks: int = 2        # per level in the encoder (+1 in the decoder)
    z_channels: int = 4
    num_groups: int = 32


@dataclass
class TextConfig:
    vocab_size: int = 49408
    n_ctx: int = 77              # token positions
    width: int = 768
    layers: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"      # CLIP-L: x * sigmoid(1.702 x); OpenCLIP bigG: exact gelu
    proj_dim: int = 0            # text_projection width (pooled output); 0 = no projection (CLIP-L in SDXL)
    head_dim: int = 64


@dataclass
class SDXLConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    te1: TextConfig = field(default_factory=TextConfig)  # CLIP ViT-L/14
    te2: TextConfig = field(default_factory=lambda: TextConfig(width=1280, layers=32, mlp_dim=5120, act="gelu",
                                                               proj_dim=1280))  # OpenCLIP ViT-bigG/14

    def __post_init__(self):
        # the UNet reads cat(te1, te2) as context and (pooled te2, 6 time ids) as y
        assert self.unet.context_dim == self.te1.width + self.te2.width, "context_dim must be te1 + te2 width"
        assert self.unet.adm_in_channels == self.te2.proj_dim + 6 * TIME_ID_DIM, "adm must be pooled + 6*256"

    @classmethod
    def tiny(cls, vocab_size=1024):
        """SDXL topology at toy widths, for CPU tests and the offline demo. te2 keeps 10 blocks because diffusers
        recognises an SDXL base file by `conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias`."""
        te1 = TextConfig(vocab_size=vocab_size, width=64, layers=2, mlp_dim=256)
        te2 = TextConfig(vocab_size=vocab_size, width=128, layers=10, mlp_dim=512, act="gelu", proj_dim=128)
        unet = UNetConfig(model_channels=32, channel_mult=(1, 2, 4), transformer_depth=(0, 1, 1),
                          transformer_depth_middle=1, context_dim=te1.width + te2.width,
                          adm_in_channels=te2.proj_dim + 6 * TIME_ID_DIM)
        return cls(unet=unet, vae=VAEConfig(ch=32, ch_mult=(1, 2, 4, 4)), te1=te1, te2=te2)

# -----------------------------------------------------------------------------
# shared pieces

def timestep_embedding(t, dim, max_period=10000):
    """sgm sinusoid: [cos(t f), sin(t f)] with f_i = max_period^(-i/half) -- cos first, divided by half
    (= diffusers Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)). t (B,) -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def build_y(pooled, time_ids, dim=TIME_ID_DIM):
    """SDXL's vector conditioning: y = [pooled bigG, E(orig_h), E(orig_w), E(crop_top), E(crop_left),
    E(target_h), E(target_w)], E = timestep_embedding(., 256). pooled (B, P), time_ids (B, 6) -> (B, P + 6*dim)."""
    B = time_ids.shape[0]
    emb = timestep_embedding(time_ids.reshape(-1), dim).reshape(B, 6 * dim)
    return torch.cat([pooled, emb.to(pooled.dtype)], dim=-1)


def attention(q, k, v, heads, causal=False):
    """Multi-head SDPA on (B, T, heads*D) tensors; k, v may have another length (cross-attention)."""
    B, T, C = q.shape
    q, k, v = (x.view(B, -1, heads, C // heads).transpose(1, 2) for x in (q, k, v))  # (B, heads, T, D)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(B, T, C)


def _ns(**children):
    """A bare module that only reproduces a level of the checkpoint's key path (e.g. `model.diffusion_model`)."""
    m = nn.Module()
    for name, child in children.items():
        setattr(m, name, child)
    return m

# -----------------------------------------------------------------------------
# UNet (sgm openaimodel.py as configured for SDXL)

class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back, as sgm's GroupNorm32 does in the ResBlocks and `out.0`, so bf16
    runs keep the reference's numerics there. Casts around one functional call: no branch, no graph break."""
    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim, groups):
        super().__init__()
        # index 2 of out_layers is sgm's dropout slot: an Identity keeps the conv at index 3, as in the file
        self.in_layers = nn.Sequential(GroupNorm32(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(GroupNorm32(groups, cout), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):  # x (B, cin, H, W), emb (B, emb_dim)
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None].to(x.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)  # no bias on q/k/v, bias on to_out.0 (as in the file)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x, context=None):  # x (B, T, dim), context (B, 77, context_dim) or None = self-attention
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)  # first half is the value, second half the gate
        return x * F.gelu(gate)                  # exact-erf gelu


class TransformerBlock(nn.Module):
    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.ff = _ns(net=nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)))  # ff.net.{0,2}
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff.net(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, ch, depth, context_dim, heads, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)  # eps 1e-6 here, 1e-5 in the ResBlocks; not upcast in sgm
        self.proj_in = nn.Linear(ch, ch)                # linear proj_in/out (SD1.5 used 1x1 convs)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(ch, context_dim, heads) for _ in range(depth)])
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x, context):  # x (B, C, H, W)
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, HW, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        # residual first: the sum then keeps x's memory layout (a permuted first operand would make it
        # channels_last and every later conv reorder its weights on CPU)
        return x + self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.ModuleList):
    """sgm's TimestepEmbedSequential: run the layers in order, giving each the inputs it takes."""
    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_ckpt = False  # True: recompute each block in backward (+33% FLOPs, ~1/5 the activations)
        mc, G, emb_dim = cfg.model_channels, cfg.num_groups, 4 * cfg.model_channels
        res = lambda cin, cout: ResBlock(cin, cout, emb_dim, G)
        attn = lambda ch, depth: SpatialTransformer(ch, depth, cfg.context_dim, ch // cfg.head_dim, G)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(),
                                                     nn.Linear(emb_dim, emb_dim)))
        # encoder: conv, then per level num_res_blocks x (ResBlock [+ transformer]) and a Downsample (not last)
        self.input_blocks = nn.ModuleList([Block([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        skip_ch, ch = [mc], mc  # channels of every skip, pushed after each input block
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mc * mult)]
                ch = mc * mult
                if cfg.transformer_depth[level]:
                    layers.append(attn(ch, cfg.transformer_depth[level]))
                self.input_blocks.append(Block(layers))
                skip_ch.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.input_blocks.append(Block([Downsample(ch)]))
                skip_ch.append(ch)
        self.middle_block = Block([res(ch, ch), attn(ch, cfg.transformer_depth_middle), res(ch, ch)])
        # decoder: per level (deepest first) num_res_blocks + 1 x (ResBlock on cat(h, skip) [+ transformer]),
        # the last one of each level (not level 0) ending in an Upsample
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_ch.pop(), mc * mult)]
                ch = mc * mult
                if cfg.transformer_depth[level]:
                    layers.append(attn(ch, cfg.transformer_depth[level]))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(layers))
        self.out = nn.Sequential(GroupNorm32(G, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def _run(self, block, h, emb, context):
        if self.grad_ckpt and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x, t, context, y):
        """x (B, 4, h, w) noisy latents, t (B,) DDPM index, context (B, 77, ctx), y (B, adm) -> (B, 4, h, w).
        h and w must be multiples of 2^(levels-1) (4 for SDXL) so the skips line up."""
        dtype = self.out[2].weight.dtype  # inputs follow the weights (pure-bf16 mode); autocast still applies
        x, context, y = x.to(dtype), context.to(dtype), y.to(dtype)
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype)) + self.label_emb(y)
        skips, h = [], x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

# -----------------------------------------------------------------------------
# VAE (sgm model.py Encoder/Decoder + AutoencoderKL, attention in the mid blocks only)

class VAEResBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs ([C, C, 1, 1] in the file)."""
    def __init__(self, ch, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.q, self.k, self.v = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj_out(h.transpose(2, 3).reshape(B, C, H, W))


class VAEDownsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: pad right/bottom only, then no conv padding


def _mid(ch, groups):
    return _ns(block_1=VAEResBlock(ch, ch, groups), attn_1=VAEAttention(ch, groups),
               block_2=VAEResBlock(ch, ch, groups))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        G, chs = cfg.num_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, c in enumerate(chs):
            blocks = [VAEResBlock(cin if j == 0 else c, c, G) for j in range(cfg.num_res_blocks)]
            last = i == len(chs) - 1
            self.down.append(_ns(block=nn.ModuleList(blocks), downsample=nn.Identity() if last else VAEDownsample(c)))
            cin = c
        self.mid = _mid(chs[-1], G)
        self.norm_out = nn.GroupNorm(G, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.z_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        G, chs = cfg.num_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, chs[-1], 3, padding=1)
        self.mid = _mid(chs[-1], G)
        # up.{i} is stored by level (up.0 = full resolution) but runs deepest first, i = len-1 -> 0
        ups, cin = [], chs[-1]
        for i in reversed(range(len(chs))):
            blocks = [VAEResBlock(cin if j == 0 else chs[i], chs[i], G) for j in range(cfg.num_res_blocks + 1)]
            ups.insert(0, _ns(block=nn.ModuleList(blocks), upsample=Upsample(chs[i]) if i > 0 else nn.Identity()))
            cin = chs[i]
        self.up = nn.ModuleList(ups)
        self.norm_out = nn.GroupNorm(G, chs[0], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[0], cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, img):
        """img (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, 4, ~H/8, ~W/8), UNSCALED (x VAE_SCALE for the
        UNet). Run it in fp32 or bf16: the SDXL VAE overflows in fp16."""
        mean, logvar = self.quant_conv(self.encoder(img)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """Unscaled latents (B, 4, h, w) -> image (B, 3, 8h, 8w), about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

# -----------------------------------------------------------------------------
# text encoders: CLIP-L in HF transformers naming, OpenCLIP bigG in open_clip naming. Causal mask only: SDXL
# never masked padding, and the pad tokens' states are part of the context the UNet was trained on.

ACT = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}


class CLIPLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        W = cfg.width
        self.heads, self.act = W // cfg.head_dim, ACT[cfg.act]
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(W), nn.LayerNorm(W)
        self.self_attn = _ns(q_proj=nn.Linear(W, W), k_proj=nn.Linear(W, W), v_proj=nn.Linear(W, W),
                             out_proj=nn.Linear(W, W))
        self.mlp = _ns(fc1=nn.Linear(W, cfg.mlp_dim), fc2=nn.Linear(cfg.mlp_dim, W))

    def forward(self, x):  # pre-LN: x += attn(ln1(x)); x += mlp(ln2(x))
        a, h = self.self_attn, self.layer_norm1(x)
        x = x + a.out_proj(attention(a.q_proj(h), a.k_proj(h), a.v_proj(h), self.heads, causal=True))
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))


class CLIPTextEncoder(nn.Module):
    """te1, CLIP ViT-L/14. Returns the penultimate hidden state (output of layer L-2, no final LayerNorm):
    the last layer and final_layer_norm are in the file (and kept, so save writes them) but SDXL never uses them."""
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = _ns(token_embedding=nn.Embedding(cfg.vocab_size, cfg.width),
                              position_embedding=nn.Embedding(cfg.n_ctx, cfg.width))
        self.encoder = _ns(layers=nn.ModuleList([CLIPLayer(cfg) for _ in range(cfg.layers)]))
        self.final_layer_norm = nn.LayerNorm(cfg.width)

    def forward(self, tokens):  # (B, 77) -> (B, 77, width)
        x = self.embeddings.token_embedding(tokens) + self.embeddings.position_embedding.weight[: tokens.shape[1]]
        for layer in self.encoder.layers[:-1]:
            x = layer(x)
        return x


class OpenCLIPLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        W = cfg.width
        self.heads, self.act = W // cfg.head_dim, ACT[cfg.act]
        self.ln_1, self.ln_2 = nn.LayerNorm(W), nn.LayerNorm(W)
        # nn.MultiheadAttention's layout: q, k, v stacked in one [3W, W] matrix
        self.attn = _ns(in_proj_weight=nn.Parameter(torch.randn(3 * W, W) * W ** -0.5),
                        in_proj_bias=nn.Parameter(torch.zeros(3 * W)), out_proj=nn.Linear(W, W))
        self.mlp = _ns(c_fc=nn.Linear(W, cfg.mlp_dim), c_proj=nn.Linear(cfg.mlp_dim, W))

    def forward(self, x):
        q, k, v = F.linear(self.ln_1(x), self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, dim=-1)
        x = x + self.attn.out_proj(attention(q, k, v, self.heads, causal=True))
        return x + self.mlp.c_proj(self.act(self.mlp.c_fc(self.ln_2(x))))


class OpenCLIPTextEncoder(nn.Module):
    """te2, OpenCLIP ViT-bigG/14. Returns (penultimate hidden state = input of the last block, no ln_final;
    pooled = ln_final(last block output)[argmax(tokens)] @ text_projection). argmax finds EOS because EOS is the
    largest id and te2 pads with 0."""
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.n_ctx, cfg.width) * 0.01)
        self.transformer = _ns(resblocks=nn.ModuleList([OpenCLIPLayer(cfg) for _ in range(cfg.layers)]))
        self.ln_final = nn.LayerNorm(cfg.width)
        # pooled = x @ W with W [width, proj_dim] (open_clip orientation; transformers stores W.T)
        self.text_projection = nn.Parameter(torch.randn(cfg.width, cfg.proj_dim) * cfg.width ** -0.5)
        # CLIP's contrastive temperature: unused here, a buffer (not trained) so save writes it back
        self.register_buffer("logit_scale", torch.full((), math.log(1 / 0.07)))

    def forward(self, tokens):  # (B, 77) -> (B, 77, width), (B, proj_dim)
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for block in self.transformer.resblocks[:-1]:
            x = block(x)
        hidden = x
        x = self.ln_final(self.transformer.resblocks[-1](x))
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection
        return hidden, pooled

# -----------------------------------------------------------------------------
# the whole model, named like the checkpoint

PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
          "te1": "conditioner.embedders.0.transformer.text_model.", "te2": "conditioner.embedders.1.model."}


class SDXL(nn.Module):
    """Container whose state_dict() keys are the sgm file's keys; use the unet / vae / te1 / te2 properties."""
    def __init__(self, cfg: SDXLConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or SDXLConfig()
        self.model = _ns(diffusion_model=UNet(cfg.unet))
        self.first_stage_model = VAE(cfg.vae)
        self.conditioner = _ns(embedders=nn.ModuleList([
            _ns(transformer=_ns(text_model=CLIPTextEncoder(cfg.te1))), _ns(model=OpenCLIPTextEncoder(cfg.te2))]))

    unet = property(lambda self: self.model.diffusion_model)
    vae = property(lambda self: self.first_stage_model)
    te1 = property(lambda self: self.conditioner.embedders[0].transformer.text_model)
    te2 = property(lambda self: self.conditioner.embedders[1].model)

    def encode_text(self, tokens1, tokens2):
        """tokens1 (CLIP-L ids, EOS padding), tokens2 (bigG ids, 0 padding), (B, 77) each ->
        (context (B, 77, te1 + te2 width), pooled (B, proj_dim))."""
        h2, pooled = self.te2(tokens2)
        return torch.cat([self.te1(tokens1), h2], dim=-1), pooled


@torch.no_grad()
def init_random_(model: nn.Module, seed=0):
    """Fill EVERY parameter and buffer with random values at sane scales: matrices ~ N(0, 1/fan_in), norm gains
    ~ 1 + N(0, 0.1), biases ~ N(0, 0.1). For tests and random-weight benchmarks, where the sgm init (zeroed output
    convs, unit norms, zero biases) would hide bugs: a zeroed out.2 makes every UNet output zero."""
    gens = {}  # one generator per device: sampling on the GPU, not on the CPU and copying 3.5B numbers over
    for name, p in model.state_dict(keep_vars=True).items():
        if p.device not in gens:
            gens[p.device] = torch.Generator(p.device).manual_seed(seed)
        g = gens[p.device]
        if name.endswith("logit_scale"):
            p.fill_(math.log(1 / 0.07))
        elif p.ndim <= 1:
            p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1, generator=g)
        elif "embedding" in name:
            p.normal_(0.0, 0.5, generator=g)
        else:  # Linear/Conv [out, in, ...]; text_projection is [in, out] (x @ W)
            fan_in = p.shape[0] if name.endswith("text_projection") else p[0].numel()
            p.normal_(0.0, fan_in ** -0.5, generator=g)
    return model

# -----------------------------------------------------------------------------
# dense bf16 peak of the devices we know, for MFU (train.py and bench.py); longest name first wins

PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0,
               "L40S": 362.0, "4090": 165.0, "A6000": 155.0, "L4": 121.0, "B200": 2250.0}


def peak_tflops(device_name):
    """Dense bf16 TFLOP/s for a CUDA device name, 0.0 when unknown (MFU is then not printed)."""
    return next((v for key, v in PEAK_TFLOPS.items() if key in device_name), 0.0)


# -----------------------------------------------------------------------------
# optimizers (as nanoGPT's configure_optimizers: train.py and bench.py build them the same way)

def stochastic_round_bf16(x, generator=None):
    """fp32 -> bf16, rounding up or down with probability proportional to closeness, so E[out] = x.
    bf16 is the top half of fp32's bits: add uniform noise to the 16 bits that are cut, then truncate."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # exact: low bits are zero


BNB_BLOCK = 256  # bitsandbytes' blockwise 8-bit state: one absmax per 256 consecutive elements
BNB_MIN_8BIT = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep 32-bit state


class FlatAdamW8bit(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit: its own update kernels, quantisation maps, block size and 8/32-bit split, the
    same numbers as bnb.optim.AdamW8bit, but run over a few flat buffers instead of once per tensor.

    Why: bnb steps tensor by tensor (1680 on the SDXL UNet), each a Python call, a custom-op dispatch and a
    kernel launch, and it synchronises the device after each one; on an H200 that step took 97 ms of a
    426 ms batch-4 step. Here every parameter and its grad become
    views into one buffer per (param group, 8/32-bit state), each tensor starting on a 256-element block
    boundary, so the blockwise quantisation sees exactly the blocks it sees per tensor (the zero padding
    leaves every absmax alone) and one kernel call updates a whole buffer.
    Also: (1) views keep each parameter's memory format (channels_last conv weights stay NHWC; bnb's own
    update_step makes them contiguous, which breaks a UNet compiled for channels_last); (2) bf16 weights keep
    sub-ulp updates (math.md §7): the update runs in fp32 on a chunk copy and is written back with stochastic
    rounding, one chunk at a time instead of fp32 master weights.
    Contract: build it after the model's last .to(); parameters that get no gradient see a zero one (Adam's
    momentum still moves them; bnb would skip them); a grad replaced by assignment is copied into the buffer."""

    def __init__(self, groups, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, seed=0, chunk=0):
        import bitsandbytes.functional as bnbF
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0))
        self.bnbF, self.seed, self.chunk, self.n_steps, self.sr_gen = bnbF, seed, chunk, 0, None
        assert chunk % BNB_BLOCK == 0, "chunks (elements per kernel call; 0 = by device) are whole 256-blocks"
        self.buffers = [self._flatten(gi, ps, eight) for gi, group in enumerate(self.param_groups)
                        for eight in (True, False)
                        if (ps := [p for p in group["params"] if (p.numel() >= BNB_MIN_8BIT) == eight])]
        dev = self.buffers[0]["p"].device if self.buffers else "cpu"
        self.qmap1 = bnbF.create_dynamic_map(signed=True).to(dev)  # bnb's "dynamic" map: first moment
        self.qmap2 = bnbF.create_dynamic_map(signed=False).to(dev)  # "udynamic": second moment

    @torch.no_grad()
    def _flatten(self, gi, ps, eight):
        dev, dt = ps[0].device, ps[0].dtype
        offsets, n = [], 0
        for p in ps:
            assert p.device == dev and p.dtype == dt, "one device and dtype per parameter group"
            assert p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last), "dense parameters only"
            offsets.append(n)
            n += -(-p.numel() // BNB_BLOCK) * BNB_BLOCK
        flat_p, flat_g = torch.zeros(n, dtype=dt, device=dev), torch.zeros(n, dtype=dt, device=dev)
        for p, o in zip(ps, offsets):  # the old storage of each parameter is freed as it moves
            p.data = flat_p.as_strided(p.shape, p.stride(), o).copy_(p.data)
            p.grad = flat_g.as_strided(p.shape, p.stride(), o)
        buf = {"group": gi, "p": flat_p, "g": flat_g, "params": ps, "grads": [p.grad for p in ps],
               "ptrs": [p.data_ptr() for p in ps]}
        state = torch.uint8 if eight else torch.float32  # the 8-bit state carries one fp32 absmax per block
        buf.update(state1=torch.zeros(n, dtype=state, device=dev), state2=torch.zeros(n, dtype=state, device=dev))
        if eight:
            buf.update(absmax1=torch.zeros(n // BNB_BLOCK, device=dev), absmax2=torch.zeros(n // BNB_BLOCK, device=dev))
        return buf

    def _check(self, buf):
        for p, g, ptr in zip(buf["params"], buf["grads"], buf["ptrs"]):
            if p.data_ptr() != ptr:
                raise RuntimeError(f"parameter {tuple(p.shape)} no longer lives in the optimizer's flat buffer (was "
                                   "the model moved or cast after configure_optimizer?): build the optimizer last")
            if p.grad is not g:  # assigned, or recreated after someone set it to None: take its values
                g.copy_(p.grad if p.grad is not None else torch.zeros_like(g))
                p.grad = g

    def _update(self, buf, group, p, g, lo, hi):
        """One bitsandbytes kernel call over elements [lo, hi) of a buffer (p, g: those elements)."""
        beta1, beta2 = group["betas"]
        s1, s2 = buf["state1"][lo:hi], buf["state2"][lo:hi]
        if "absmax1" in buf:  # lo, hi are block aligned
            a, b = lo // BNB_BLOCK, hi // BNB_BLOCK
            self.bnbF.optimizer_update_8bit_blockwise(
                "adam", g, p, s1, s2, beta1, beta2, 0.0, 0.0, group["eps"], self.n_steps, group["lr"], self.qmap1,
                self.qmap2, buf["absmax1"][a:b], buf["absmax2"][a:b], group["weight_decay"], gnorm_scale=1.0)
        else:
            self.bnbF.optimizer_update_32bit("adam", g, p, s1, beta1, group["eps"], self.n_steps, group["lr"], s2,
                                            beta2, 0.0, 0.0, group["weight_decay"], 1.0)

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "no closure"
        self.n_steps += 1
        for buf in self.buffers:
            self._check(buf)
            group, p, g = self.param_groups[buf["group"]], buf["p"], buf["g"]
            if p.dtype == torch.bfloat16 and self.sr_gen is None:
                self.sr_gen = torch.Generator(device=p.device).manual_seed(self.seed)
            chunk = self.chunk or (1 << 26 if p.is_cuda else 1 << 20)  # CPU: temporaries that stay in cache
            for lo in range(0, p.numel(), chunk):
                hi = min(p.numel(), lo + chunk)
                if p.dtype != torch.bfloat16:
                    self._update(buf, group, p[lo:hi], g[lo:hi], lo, hi)
                    continue
                q = p[lo:hi].float()
                self._update(buf, group, q, g[lo:hi].float(), lo, hi)
                p[lo:hi] = stochastic_round_bf16(q, self.sr_gen)

    @torch.no_grad()
    def zero_grad(self, set_to_none=True):
        """Zero the flat grad buffers (one fill each); grads stay views, whatever set_to_none says."""
        for buf in self.buffers:
            self._check(buf)
            buf["g"].zero_()

    def _layout(self):
        return [[buf["group"]] + [p.numel() for p in buf["params"]] for buf in self.buffers]

    def state_dict(self):
        keys = ("state1", "state2", "absmax1", "absmax2")
        return {"n_steps": self.n_steps, "layout": self._layout(),
                "buffers": [{k: buf[k] for k in keys if k in buf} for buf in self.buffers],
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
                "sr_gen": self.sr_gen.get_state() if self.sr_gen is not None else None}

    @torch.no_grad()
    def load_state_dict(self, sd):
        if sd.get("layout") != self._layout():
            raise ValueError("optimizer state was saved for a different set of parameters (layout differs)")
        for buf, saved in zip(self.buffers, sd["buffers"]):
            for k, v in saved.items():
                buf[k].copy_(v)
        for group, saved in zip(self.param_groups, sd["param_groups"]):
            group.update(saved)
        self.n_steps = sd["n_steps"]
        if sd["sr_gen"] is not None:
            self.sr_gen = torch.Generator(device=self.buffers[0]["p"].device)
            self.sr_gen.set_state(sd["sr_gen"])


def configure_optimizer(params, name="adamw8bit", lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01,
                        fused=False, seed=0):
    """Decoupled weight decay on >= 2-D tensors (matmul/conv weights) only, as nanoGPT.
    adamw8bit: bitsandbytes' 8-bit AdamW on flat buffers (FlatAdamW8bit: parameters and grads become views,
    so build it after the model's last .to()), stochastic rounding for bf16 weights;
    adamw: torch (fused on CUDA); adafactor: torch.optim.Adafactor (no betas)."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if name == "adamw8bit":
        return FlatAdamW8bit(groups, lr=lr, betas=betas, eps=eps, seed=seed)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=lr)
    raise ValueError(f"optimizer must be adamw8bit | adamw | adafactor, got {name!r}")

# -----------------------------------------------------------------------------
# load / save the single-file checkpoint

class CheckpointError(ValueError):
    """The file is not an SDXL base checkpoint in the sgm layout; the message says what is wrong / what it is."""


IGNORED_KEYS = {"v_pred", "ztsnr", PREFIX["te1"] + "embeddings.position_ids"}  # markers, constant int64 ids


def _count(shapes, prefix):
    """Number of numbered children under prefix: _count(shapes, '...encoder.layers.') == 12 for CLIP-L."""
    ids = {k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)}
    return max((int(i) + 1 for i in ids if i.isdigit()), default=0)


def _few(keys, n=4):
    keys = sorted(keys)
    return f"{len(keys)} ({', '.join(keys[:n])}{', ...' if len(keys) > n else ''})"


def _looks_like(keys):
    has = lambda prefix: any(k.startswith(prefix) for k in keys)
    if has("cond_stage_model."):
        return "an SD1.x/SD2.x checkpoint (text encoder under cond_stage_model.)"
    if has("conditioner.embedders.0.model.") or (has("conditioner.") and not has(PREFIX["te1"])):
        return "an SDXL refiner checkpoint (embedder 0 is OpenCLIP bigG, no CLIP-L)"
    if has(PREFIX["unet"]) and not has("first_stage_model.") and not has("conditioner."):
        return "a UNet-only sgm file (no VAE, no text encoders)"
    if has("down_blocks.") or has("unet.") or has("lora_"):
        return "a diffusers-format model or a LoRA, not a single-file sgm checkpoint"
    return "something else"


def config_from_shapes(shapes: dict) -> SDXLConfig:
    """Infer every SDXLConfig field from {key: shape} of an sgm file. Not in the file, so fixed: attention heads
    are 64 wide (SDXL everywhere), GroupNorm has 32 groups, each time id is embedded with 256 channels."""
    s = lambda part, key: shapes[PREFIX[part] + key]
    # UNet: levels = downsamples + 1; ResBlocks per level from the position of the first downsample
    u = PREFIX["unet"]
    mc, cin = s("unet", "input_blocks.0.0.weight")[:2]
    n_in = _count(shapes, u + "input_blocks.")
    downs = [i for i in range(n_in) if f"{u}input_blocks.{i}.0.op.weight" in shapes]
    nrb = downs[0] - 1 if downs else n_in - 1
    firsts = [1 + level * (nrb + 1) for level in range(len(downs) + 1)]  # first input block of each level
    unet = UNetConfig(
        in_channels=cin, out_channels=s("unet", "out.2.weight")[0], model_channels=mc,
        channel_mult=tuple(s("unet", f"input_blocks.{i}.0.out_layers.3.weight")[0] // mc for i in firsts),
        num_res_blocks=nrb,
        transformer_depth=tuple(_count(shapes, f"{u}input_blocks.{i}.1.transformer_blocks.") for i in firsts),
        transformer_depth_middle=_count(shapes, u + "middle_block.1.transformer_blocks."),
        context_dim=s("unet", "middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        adm_in_channels=s("unet", "label_emb.0.0.weight")[1])
    v = PREFIX["vae"]
    vae_ch, vae_in = s("vae", "encoder.conv_in.weight")[:2]
    n_down = _count(shapes, v + "encoder.down.")
    vae = VAEConfig(in_channels=vae_in, ch=vae_ch, z_channels=s("vae", "decoder.conv_in.weight")[1],
                    ch_mult=tuple(s("vae", f"encoder.down.{i}.block.0.conv1.weight")[0] // vae_ch
                                  for i in range(n_down)),
                    num_res_blocks=_count(shapes, v + "encoder.down.0.block."))
    vocab1, w1 = s("te1", "embeddings.token_embedding.weight")
    te1 = TextConfig(vocab_size=vocab1, width=w1, n_ctx=s("te1", "embeddings.position_embedding.weight")[0],
                     layers=_count(shapes, PREFIX["te1"] + "encoder.layers."),
                     mlp_dim=s("te1", "encoder.layers.0.mlp.fc1.weight")[0], act="quick_gelu")
    vocab2, w2 = s("te2", "token_embedding.weight")
    te2 = TextConfig(vocab_size=vocab2, width=w2, n_ctx=s("te2", "positional_embedding")[0],
                     layers=_count(shapes, PREFIX["te2"] + "transformer.resblocks."),
                     mlp_dim=s("te2", "transformer.resblocks.0.mlp.c_fc.weight")[0], act="gelu",
                     proj_dim=s("te2", "text_projection")[1])
    if unet.context_dim != w1 + w2 or unet.adm_in_channels != te2.proj_dim + 6 * TIME_ID_DIM:
        raise CheckpointError(f"UNet context width {unet.context_dim} / y width {unet.adm_in_channels} do not match "
                              f"the text encoders ({w1} + {w2}; {te2.proj_dim} + 6*{TIME_ID_DIM})")
    # A file without CLIP-L's last layer (unused by SDXL) would be read as an 11-layer encoder whose penultimate
    # state is one layer too early -- silently wrong conditioning. So we refuse it rather than accept it.
    if w1 == 768 and te1.layers != 12:
        raise CheckpointError(f"CLIP-L (width 768) has {te1.layers} layers in this file, expected 12 (a pruned "
                              f"last layer would shift the penultimate hidden state; restore the full encoder)")
    return SDXLConfig(unet=unet, vae=vae, te1=te1, te2=te2)


def fetch(spec):
    """hf:OWNER/NAME/FILE -> a local path through huggingface_hub's cache (lazy import); else a local path."""
    if not spec.startswith("hf:"):
        return spec
    from huggingface_hub import hf_hub_download
    owner, name, filename = spec[3:].split("/", 2)
    return hf_hub_download(f"{owner}/{name}", filename)


def load_checkpoint(path, device="cpu", dtype=torch.float32) -> SDXL:
    """Load an SDXL base single-file sgm checkpoint (.safetensors). Sizes come from the tensor shapes; the model is
    built on the meta device and each tensor is read (memory-mapped) and cast on its own, so RAM never holds a
    second copy. Raises CheckpointError (a ValueError) naming what is missing / unexpected / mis-shaped."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found (or not a file): {path}")
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError for a bad header, OSError for an unreadable file
        with open(path, "rb") as fh:
            head = fh.read(2)
        pickle = head[:1] == b"\x80" or head == b"PK"  # torch.save: zip archive (new) or bare pickle (old)
        hint = " It looks like a PyTorch pickle (.ckpt/.pt); convert it to .safetensors." if pickle else ""
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated, or another format): "
                              f"{e}.{hint}") from None
    with f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        missing_parts = [p for p in PREFIX.values() if not any(k.startswith(p) for k in shapes)]
        if missing_parts:
            raise CheckpointError(f"{path}: not an SDXL base checkpoint in the sgm layout; it looks like "
                                  f"{_looks_like(shapes)}. No keys under {', '.join(missing_parts)}")
        try:
            cfg = config_from_shapes(shapes)
        except KeyError as e:
            raise CheckpointError(f"{path}: missing key {e.args[0]} (needed to infer the model sizes)") from None
        with torch.device("meta"):
            sdxl = SDXL(cfg)
        expected = {k: tuple(t.shape) for k, t in sdxl.state_dict().items()}
        missing = expected.keys() - shapes.keys()
        unexpected = shapes.keys() - expected.keys() - IGNORED_KEYS
        misshaped = [f"{k} {shapes[k]} vs {expected[k]}" for k in expected.keys() & shapes.keys()
                     if shapes[k] != expected[k]]
        if missing or unexpected or misshaped:
            raise CheckpointError(f"{path}: keys do not match the SDXL layout inferred from the file's shapes: "
                                  f"missing {_few(missing)}; unexpected {_few(unexpected)}; "
                                  f"mis-shaped (file vs model) {_few(misshaped, 3)}")
        state = {}
        for k in expected:
            t = f.get_tensor(k)
            state[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        metadata = f.metadata() or {}
    sdxl.load_state_dict(state, strict=True, assign=True)
    sdxl.v_pred, sdxl.ztsnr, sdxl.metadata = "v_pred" in shapes, "ztsnr" in shapes, metadata
    return sdxl


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
              torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(tensors, path, metadata, dtype=None):
    """The safetensors format written by hand: 8-byte header length, JSON header, raw little-endian data.
    Keys and metadata in sorted order, so the same weights always give the same bytes (safetensors' own
    writer orders metadata by a randomly seeded hash map), and one tensor at a time is cast and copied,
    so SDXL is never held twice in RAM. Atomic: a temp file in the same folder, then os.replace.
    dtype: cast floating-point tensors to it on the way out (None = keep)."""
    names = sorted(tensors)
    out_dtype = {k: dtype if dtype is not None and tensors[k].is_floating_point() else tensors[k].dtype for k in names}
    header, offset = {"__metadata__": dict(sorted(metadata.items()))}, 0
    for k in names:
        n = tensors[k].numel() * torch.empty((), dtype=out_dtype[k]).element_size()
        header[k] = {"dtype": _ST_DTYPES[out_dtype[k]], "shape": list(tensors[k].shape),
                     "data_offsets": [offset, offset + n]}
        offset += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the data starts 8-byte aligned
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h)
            for k in names:
                t = tensors[k].detach().to(out_dtype[k]).contiguous().cpu()
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(sdxl, path, v_pred=True, ztsnr=True, metadata=None, dtype=None):
    """Write the sgm layout (the file's 2515 keys for SDXL base) + `v_pred` / `ztsnr` empty markers (ComfyUI,
    Forge, A1111 read them) + modelspec metadata, atomically (temp file in the same folder, then os.replace).
    dtype: export dtype for float tensors (torch.float16 / bfloat16 / float32), None = keep. metadata: extra
    entries, non-str values JSON-encoded. Works on the raw module: a torch.compile wrapper is unwrapped."""
    sdxl = getattr(sdxl, "_orig_mod", sdxl)
    tensors = {}
    for k, t in sdxl.state_dict().items():
        tensors[k.replace("_orig_mod.", "")] = t  # a compiled submodule adds _orig_mod.
    tensors[PREFIX["te1"] + "embeddings.position_ids"] = torch.arange(sdxl.cfg.te1.n_ctx, dtype=torch.int64)[None]
    for marker, on in (("v_pred", v_pred), ("ztsnr", ztsnr)):
        if on:
            tensors[marker] = torch.zeros(0)  # cast like the rest; empty either way
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base",
            "modelspec.implementation": "sgm", "modelspec.prediction_type": "v" if v_pred else "epsilon",
            "modelspec.title": os.path.splitext(os.path.basename(path))[0],
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    write_safetensors(tensors, path, meta, dtype)

# -----------------------------------------------------------------------------
# diffusers config folder, so StableDiffusionXLPipeline.from_single_file(file, config=folder) gets the schedule
# right (no UI can read beta_end or zero-SNR from the file itself)

def write_diffusers_config(cfg: SDXLConfig, folder, beta_end=0.012, zsnr=False, prediction="v", tokenizer_dirs=None):
    """Write model_index.json + scheduler/unet/vae/text_encoder(_2)/tokenizer(_2) configs for `cfg`.
    The scheduler is DDIM (eta=0), trailing spacing, final step to x0: the sampler in schedule.py.
    tokenizer_dirs: (dir1, dir2) each holding vocab.json + merges.txt (SDXL's tokenizer/ and tokenizer_2/), or None
    to leave the tokenizers out of the pipeline (pass tokenizer=... to from_single_file then)."""
    u, v, t1, t2 = cfg.unet, cfg.vae, cfg.te1, cfg.te2
    # diffusers builds the middle block with the deepest level's depth, so the two must agree
    assert u.transformer_depth_middle == u.transformer_depth[-1], "diffusers: middle depth must equal last level's"
    attn_levels = [d > 0 for d in u.transformer_depth]
    unet = {"_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": u.in_channels,
            "out_channels": u.out_channels, "layers_per_block": u.num_res_blocks,
            "block_out_channels": [u.model_channels * m for m in u.channel_mult],
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels)],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            # diffusers' attention_head_dim holds head COUNTS (C // 64); levels without attention ignore it
            "attention_head_dim": [max(1, u.model_channels * m // u.head_dim) for m in u.channel_mult],
            "transformer_layers_per_block": [max(1, d) for d in u.transformer_depth],
            "cross_attention_dim": u.context_dim, "use_linear_projection": True, "norm_num_groups": u.num_groups,
            "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
            "addition_embed_type": "text_time", "addition_time_embed_dim": TIME_ID_DIM,
            "projection_class_embeddings_input_dim": u.adm_in_channels, "upcast_attention": False}
    vae = {"_class_name": "AutoencoderKL", "in_channels": v.in_channels, "out_channels": v.in_channels,
           "block_out_channels": [v.ch * m for m in v.ch_mult], "layers_per_block": v.num_res_blocks,
           "down_block_types": ["DownEncoderBlock2D"] * len(v.ch_mult),
           "up_block_types": ["UpDecoderBlock2D"] * len(v.ch_mult), "latent_channels": v.z_channels,
           "norm_num_groups": v.num_groups, "act_fn": "silu", "sample_size": 1024, "scaling_factor": VAE_SCALE,
           "force_upcast": True}  # fp16 overflows in this VAE: diffusers decodes in fp32 when this is set

    def text(c, arch):  # eos_token_id 2 = transformers' legacy pooling by argmax(ids), as SDXL's configs have it
        return {"architectures": [arch], "model_type": "clip_text_model", "vocab_size": c.vocab_size,
                "hidden_size": c.width, "intermediate_size": c.mlp_dim, "num_hidden_layers": c.layers,
                "num_attention_heads": c.width // c.head_dim, "max_position_embeddings": c.n_ctx,
                "hidden_act": c.act, "layer_norm_eps": 1e-5, "projection_dim": c.proj_dim or c.width,
                "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "attention_dropout": 0.0, "dropout": 0.0}
    scheduler = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                 "beta_end": beta_end, "beta_schedule": "scaled_linear", "rescale_betas_zero_snr": bool(zsnr),
                 "prediction_type": "v_prediction" if prediction == "v" else "epsilon",
                 "timestep_spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": True, "clip_sample": False}
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
             "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    files = {"model_index.json": index, "scheduler/scheduler_config.json": scheduler, "unet/config.json": unet,
             "vae/config.json": vae, "text_encoder/config.json": text(t1, "CLIPTextModel"),
             "text_encoder_2/config.json": text(t2, "CLIPTextModelWithProjection")}
    if tokenizer_dirs is None:
        index["tokenizer"] = index["tokenizer_2"] = [None, None]
    else:
        for sub, src in zip(("tokenizer", "tokenizer_2"), tokenizer_dirs):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(os.path.join(src, name), os.path.join(folder, sub, name))
            with open(os.path.join(src, "vocab.json"), encoding="utf-8") as fh:
                id_to_token = {i: tok for tok, i in json.load(fh).items()}
            # CLIP-L pads with EOS; bigG pads with id 0 ("!" in the real vocabulary)
            pad = "<|endoftext|>" if sub == "tokenizer" else id_to_token[0]
            special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                       "pad_token": pad}
            files[f"{sub}/special_tokens_map.json"] = special
            files[f"{sub}/tokenizer_config.json"] = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                                      "do_lower_case": True, **special}
    for name, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)) or folder, exist_ok=True)
        with open(os.path.join(folder, name), "w") as fh:
            json.dump(content, fh, indent=2)
