"""
SDXL base 1.0 in plain PyTorch: UNet, VAE and the two text encoders, with parameter names that ARE the
names in the single-file sgm checkpoint (`sd_xl_base_1.0.safetensors`).

    sdxl = checkpoint.load_checkpoint("sd_xl_base_1.0.safetensors", device="cuda", dtype=torch.bfloat16)
    context, pooled = sdxl.encode_text(tokens1, tokens2)     # (B, 77, 2048), (B, 1280)
    y = build_y(pooled, time_ids)                             # (B, 2816); time_ids (B, 6) = (h, w, top, left, h, w)
    out = sdxl.unet(z, t, context, y)                         # (B, 4, h, w)
    checkpoint.save_checkpoint(sdxl, "out/model.safetensors", v_pred=True, ztsnr=True)

`SDXL().state_dict()` keys are the file's keys (the idea of kohya-ss sd-scripts' sdxl_original_unet.py), and
every size is a config field that load_checkpoint infers from tensor shapes, so the tiny model runs the same code.

References: Podell et al. 2023, SDXL (arXiv 2307.01952); Stability-AI/generative-models (sgm):
openaimodel.py (UNet), model.py (VAE), encoders/modules.py; mlfoundations/open_clip transformer.py (bigG);
HF transformers CLIPTextModel (CLIP-L). The layout and its traps: docs/sdxl_format.md.
"""
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute  # (checkpoint.py is the single-file reader)

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
    """GroupNorm in fp32, cast back: sgm's GroupNorm32 (ResBlocks and `out.0`), so bf16 keeps its numerics."""
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

    def forward(self, x, context=None):  # x (B, T, dim), context (B, S, context_dim) or None = self-attention
        # S is any length: 77 for one prompt chunk, 77 n for long prompts (docs/sdxl_format.md §8)
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
        self.grad_ckpt = False  # True: recompute each block in backward (+31% FLOPs, docs/performance.md §1)
        mc, G, emb_dim = cfg.model_channels, cfg.num_groups, 4 * cfg.model_channels
        res = lambda cin, cout: ResBlock(cin, cout, emb_dim, G)
        attn = lambda ch, depth: SpatialTransformer(ch, depth, cfg.context_dim, ch // cfg.head_dim, G)

        def level_layers(cin, level):  # a ResBlock to the level's width [+ the level's transformer]
            cout, depth = mc * cfg.channel_mult[level], cfg.transformer_depth[level]
            return [res(cin, cout)] + ([attn(cout, depth)] if depth else [])

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(),
                                                     nn.Linear(emb_dim, emb_dim)))
        # encoder: conv, then per level num_res_blocks x (ResBlock [+ transformer]) and a Downsample (not last)
        self.input_blocks = nn.ModuleList([Block([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        skip_ch, ch = [mc], mc  # channels of every skip, pushed after each input block
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(Block(level_layers(ch, level)))
                ch = mc * mult
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
                layers = level_layers(ch + skip_ch.pop(), level)
                ch = mc * mult
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(layers))
        self.out = nn.Sequential(GroupNorm32(G, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def _run(self, block, h, emb, context):
        if self.grad_ckpt and torch.is_grad_enabled():
            return recompute(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x, t, context, y):
        """x (B, 4, h, w) noisy latents, t (B,) DDPM index, context (B, 77 n, ctx), y (B, adm) -> (B, 4, h, w).
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
    return nn.Sequential(OrderedDict(block_1=VAEResBlock(ch, ch, groups), attn_1=VAEAttention(ch, groups),
                                     block_2=VAEResBlock(ch, ch, groups)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        G, chs = cfg.num_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, c in enumerate(chs):
            blocks = [VAEResBlock(cin if j == 0 else c, c, G) for j in range(cfg.num_res_blocks)]
            downsample = VAEDownsample(c) if i < len(chs) - 1 else nn.Identity()
            self.down.append(_ns(block=nn.Sequential(*blocks), downsample=downsample))
            cin = c
        self.mid = _mid(chs[-1], G)
        self.norm_out = nn.GroupNorm(G, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.z_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level.downsample(level.block(h))
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


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
            ups.insert(0, _ns(block=nn.Sequential(*blocks), upsample=Upsample(chs[i]) if i > 0 else nn.Identity()))
            cin = chs[i]
        self.up = nn.ModuleList(ups)
        self.norm_out = nn.GroupNorm(G, chs[0], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[0], cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.upsample(level.block(h))
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
    """te2, OpenCLIP ViT-bigG/14 -> (penultimate hidden state, no ln_final; pooled = ln_final(last block output) at
    argmax(tokens) @ text_projection). argmax finds EOS: it is the largest id and te2 pads with 0."""
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
        """tokens1 (CLIP-L ids, EOS padding), tokens2 (bigG ids, 0 padding), (B, 77) each -> (context (B, 77, te1 +
        te2 width), pooled (B, proj_dim)). Longer prompts: several 77-token rows (cache.encode_captions)."""
        h2, pooled = self.te2(tokens2)
        return torch.cat([self.te1(tokens1), h2], dim=-1), pooled


@torch.no_grad()
def init_random_(model: nn.Module, seed=0):
    """Fill EVERY parameter and buffer at sane scales: matrices ~ N(0, 1/fan_in), norm gains ~ 1 + N(0, 0.1), biases
    ~ N(0, 0.1). For tests and random-weight benchmarks, where sgm's zeroed output convs would hide bugs."""
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
