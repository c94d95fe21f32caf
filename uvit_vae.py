"""KL autoencoder in the Stable Diffusion KL-f8 layout (latent-diffusion `AutoencoderKL` names).

Configurations in VAE_CONFIGS:
- "sd":        the public SD VAE (83.7M parameters); `load_sd_checkpoint` loads its weights.
- "pong":      a small f8 VAE (3.9M) to train on Pong frames, 96x96 RGB <-> 12x12x4 latents.
- "pong_cpu":  a 1.0M variant that trains on a 2-core CPU in minutes (train.py's cpu preset).
- "pong_fast": a 0.7M variant, ~4x cheaper to decode in the CPU generation loop, blurrier ball.
For CPU decoding, `vae.to(memory_format=torch.channels_last)` is ~10-25% faster.

    vae = build_vae("pong")
    z = vae.encode(x).sample() * vae.scaling_factor      # x: (B, 3, 96, 96) in [-1, 1]
    x_hat = vae.decode(z / vae.scaling_factor)             # (B, 3, 96, 96)

The state-dict names match the public checkpoint key for key (encoder.down.{i}.block.{j}...,
mid.attn_1.q, quant_conv, post_quant_conv, ...). Imports only torch and the standard library.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn


def Normalize(ch, groups):
    return nn.GroupNorm(groups, ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a 1x1 `nin_shortcut` when the channel count changes."""

    def __init__(self, in_ch, out_ch, groups):
        super().__init__()
        self.norm1 = Normalize(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with q/k/v/proj_out as 1x1 convs."""

    def __init__(self, ch, groups):
        super().__init__()
        self.norm = Normalize(ch, groups)
        self.q, self.k, self.v = (nn.Conv2d(ch, ch, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale 1/sqrt(C)
        h = h[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric (0, 1, 0, 1) pad, as in latent diffusion."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Level(nn.Module):
    """One resolution of the encoder or decoder: `block` ResnetBlocks, then an optional resampler."""

    def __init__(self, blocks, resample=None, resample_name="downsample"):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()  # the SD VAE has no attention at these resolutions; kept for key names
        if resample is not None:
            setattr(self, resample_name, resample)
        self.resample_name = resample_name if resample is not None else None

    def forward(self, x):
        for blk in self.block:
            x = blk(x)
        return x if self.resample_name is None else getattr(self, self.resample_name)(x)


class Mid(nn.Module):
    """Lowest-resolution middle: ResnetBlock, single-head attention, ResnetBlock."""

    def __init__(self, ch, groups):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> posterior moments (B, 2*z, H/f, W/f) with f = 2**(len(ch_mult)-1)."""

    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, in_channels=3, norm_groups=32):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        chans = [ch * m for m in (1, *ch_mult)]
        self.down = nn.ModuleList()
        for i in range(len(ch_mult)):
            c_in, c_out = chans[i], chans[i + 1]
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, norm_groups) for j in range(num_res_blocks)]
            last = i == len(ch_mult) - 1
            self.down.append(Level(blocks, None if last else Downsample(c_out), "downsample"))
        self.mid = Mid(chans[-1], norm_groups)
        self.norm_out = Normalize(chans[-1], norm_groups)
        self.conv_out = nn.Conv2d(chans[-1], 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)
        h = self.mid(h)  # (B, ch*ch_mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2*z, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, 3, h*f, w*f); `up.{i}` is indexed by resolution level, run high i first."""

    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, out_ch=3, norm_groups=32):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = Mid(c, norm_groups)
        up = []
        for i in reversed(range(len(ch_mult))):
            c_out = ch * ch_mult[i]
            blocks = [ResnetBlock(c if j == 0 else c_out, c_out, norm_groups) for j in range(num_res_blocks + 1)]
            up.append(Level(blocks, Upsample(c_out) if i > 0 else None, "upsample"))
            c = c_out
        self.up = nn.ModuleList(reversed(up))
        self.norm_out = Normalize(c, norm_groups)
        self.conv_out = nn.Conv2d(c, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))  # (B, ch*ch_mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, h*f, w*f)


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from (B, 2*z, h, w) moments; logvar clamped to [-30, 20]."""

    def __init__(self, moments):
        self.mean, logvar = moments.float().chunk(2, dim=1)  # fp32 under bf16 autocast too: the KL, the latents
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = self.std.square()

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean

    def kl(self):
        """KL to N(0, I), summed over (z, h, w): (B,)."""
        return 0.5 * (self.mean.square() + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder: encode() -> DiagonalGaussian, decode(z) -> image, SD key names."""

    def __init__(
        self,
        ch=128,
        ch_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        z_channels=4,
        embed_dim=4,
        scaling_factor=0.18215,
        in_channels=3,
        norm_groups=32,
        decoder=None,
    ):
        super().__init__()
        ch_mult = tuple(ch_mult)
        # decoder: overrides of ch / ch_mult / num_res_blocks / norm_groups for a lighter decoder alone
        dec = {
            **dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, norm_groups=norm_groups),
            **(decoder or {}),
        }
        dec["ch_mult"] = tuple(dec["ch_mult"])
        if len(dec["ch_mult"]) != len(ch_mult):
            raise ValueError(f"the decoder needs {len(ch_mult)} levels like the encoder, got {dec['ch_mult']}")
        for c, g in [(ch * m, norm_groups) for m in ch_mult] + [
            (dec["ch"] * m, dec["norm_groups"]) for m in dec["ch_mult"]
        ]:
            if c % g:
                raise ValueError(f"norm_groups={g} must divide every channel count, not {c}")
        self.config = dict(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
            embed_dim=embed_dim,
            scaling_factor=scaling_factor,
            in_channels=in_channels,
            norm_groups=norm_groups,
            decoder=dict(decoder) if decoder else None,
        )
        self.scaling_factor = scaling_factor
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels, in_channels, norm_groups)
        self.decoder = Decoder(
            dec["ch"], dec["ch_mult"], dec["num_res_blocks"], z_channels, in_channels, dec["norm_groups"]
        )
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    def encode(self, x):
        """x (B, 3, H, W) in [-1, 1] -> posterior over (B, embed_dim, H/f, W/f) latents (unscaled)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """z (B, embed_dim, h, w), unscaled (divide diffusion latents by scaling_factor) -> (B, 3, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior=True, generator=None, noise=None):
        """Reconstruction (B, 3, H, W) and the posterior, for training. noise (B, 1, 1, 1): add Gaussian noise of
        that std, in units of the batch's latent std (so that scaling the latents up cannot drown it), before
        decoding."""
        post = self.encode(x)
        z = post.sample(generator) if sample_posterior else post.mode()
        if noise is not None:
            scale = noise * post.mean.detach().std()
            z = z + scale * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        return self.decode(z), post

    def load_sd_checkpoint(self, path):
        """Load the public SD VAE weights (e.g. autoencoder_kl.pth) strictly, with torch.load(weights_only=True).

        Accepts a raw state dict or {"state_dict": ...}, with or without the
        "first_stage_model." prefix of a full LDM checkpoint; `loss.*` keys are dropped.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"VAE checkpoint not found: {path}")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise ValueError(f"{path}: expected a state dict, found {type(sd).__name__}")
        prefix = "first_stage_model."
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
        mine = self.state_dict()
        missing, unexpected = sorted(set(mine) - set(sd)), sorted(set(sd) - set(mine))
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match AutoencoderKL{self.config}: "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        bad = [k for k in mine if mine[k].shape != sd[k].shape]
        if bad:
            raise ValueError(f"{path}: shape mismatch for {bad[:3]}: {sd[bad[0]].shape} vs {mine[bad[0]].shape}")
        self.load_state_dict(sd, strict=True)
        return self


VAE_CONFIGS = {
    "sd": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, embed_dim=4, scaling_factor=0.18215),
    # Chosen by measurement (bench.py --what vae): decoding one 12x12x4 latent takes ~45-55 ms on the 2-core CPU,
    # and it was the only candidate that redrew the 1-2 px ball in a short training probe on synthetic
    # Pong frames. scaling_factor is reset from data after training (1 / std of the latents).
    "pong": dict(
        ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1, z_channels=4, embed_dim=4, scaling_factor=1.0, norm_groups=32
    ),
    # The shipped model's VAE: trainable on a 2-core CPU in minutes (about 7x fewer FLOPs per
    # frame than "pong": the 24x24 and 12x12 levels have 64 channels instead of 128).
    "pong_cpu": dict(
        ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4, scaling_factor=1.0, norm_groups=8
    ),
    # ~4x cheaper to decode (~12-15 ms), but it blurred the ball in the same probe.
    "pong_fast": dict(
        ch=16, ch_mult=(1, 1, 2, 4), num_res_blocks=1, z_channels=4, embed_dim=4, scaling_factor=1.0, norm_groups=16
    ),
}

# Lighter decoders for `train.py vae --init RUN --decoder-only --decoder NAME`: the encoder (and so the
# latents a DiT was trained on) stays; only decoding gets cheaper. "lite": 2.4-2.9x cheaper than pong_cpu's
# decoder on the CPU (bench.py --what vae, docs/speed.md); its 96x96 level has 16 channels instead of 32.
DECODER_CONFIGS = {
    "lite": dict(ch=16, ch_mult=(1, 1, 2, 4), num_res_blocks=0, norm_groups=8),
}


def build_vae(name="pong", **overrides):
    """An AutoencoderKL from VAE_CONFIGS[name], with keyword overrides."""
    if name not in VAE_CONFIGS:
        raise ValueError(f"unknown VAE config {name!r}; choose from {sorted(VAE_CONFIGS)}")
    return AutoencoderKL(**{**VAE_CONFIGS[name], **overrides})
