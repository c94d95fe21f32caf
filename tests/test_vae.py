"""KL-f8 VAE: the SD key layout loads strictly, encode/decode shapes, posterior, save/load round trip."""

import pytest
import torch

from uvit_vae import VAE_CONFIGS, AutoencoderKL, build_vae

SD_PARAMS = 83_653_863


def sd_vae_shapes():
    """Key -> shape of the public SD KL-f8 autoencoder, written out from the latent-diffusion layout."""
    shapes = {}

    def conv(name, o, i, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (o, i, k, k), (o,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, i, o):
        norm(f"{name}.norm1", i)
        conv(f"{name}.conv1", o, i, 3)
        norm(f"{name}.norm2", o)
        conv(f"{name}.conv2", o, o, 3)
        if i != o:
            conv(f"{name}.nin_shortcut", o, i, 1)

    def mid(name, c):
        resnet(f"{name}.block_1", c, c)
        norm(f"{name}.attn_1.norm", c)
        for m in ("q", "k", "v", "proj_out"):
            conv(f"{name}.attn_1.{m}", c, c, 1)
        resnet(f"{name}.block_2", c, c)

    widths = [128, 256, 512, 512]  # ch * ch_mult
    conv("encoder.conv_in", 128, 3, 3)
    c = 128
    for i, w in enumerate(widths):
        for j in range(2):
            resnet(f"encoder.down.{i}.block.{j}", c, w)
            c = w
        if i < 3:
            conv(f"encoder.down.{i}.downsample.conv", w, w, 3)
    mid("encoder.mid", 512)
    norm("encoder.norm_out", 512)
    conv("encoder.conv_out", 8, 512, 3)

    conv("decoder.conv_in", 512, 4, 3)
    mid("decoder.mid", 512)
    c = 512
    for i in reversed(range(4)):
        for j in range(3):
            resnet(f"decoder.up.{i}.block.{j}", c, widths[i])
            c = widths[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", 128)
    conv("decoder.conv_out", 3, 128, 3)
    conv("quant_conv", 8, 8, 1)
    conv("post_quant_conv", 4, 4, 1)
    return shapes


def test_expected_layout_is_the_public_one():
    shapes = sd_vae_shapes()
    spot = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
    }
    for k, s in spot.items():
        assert shapes[k] == s, k
    total = 0
    for s in shapes.values():
        total += torch.Size(s).numel()
    assert total == SD_PARAMS


def test_sd_checkpoint_loads_strictly(tmp_path):
    shapes = sd_vae_shapes()
    vae = build_vae("sd")
    assert sum(p.numel() for p in vae.parameters()) == SD_PARAMS
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == shapes
    # the public file's wrapping: {"state_dict": {"first_stage_model.*", "loss.*", ...}}
    sd = {f"first_stage_model.{k}": torch.full(s, float(i % 97)) for i, (k, s) in enumerate(shapes.items())}
    sd["loss.logvar"] = torch.zeros(())
    sd["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
    path = tmp_path / "autoencoder_kl.pth"
    torch.save({"state_dict": sd}, path)
    vae.load_sd_checkpoint(str(path))
    got = vae.state_dict()
    for i, k in enumerate(shapes):
        assert got[k].flatten()[0].item() == float(i % 97), k


def test_raw_state_dict_and_mismatch(tmp_path):
    vae = build_vae("pong")
    path = tmp_path / "raw.pth"
    torch.save({k: torch.randn_like(v) for k, v in vae.state_dict().items()}, path)
    vae.load_sd_checkpoint(str(path))
    with pytest.raises(ValueError, match="missing"):
        build_vae("pong", num_res_blocks=2).load_sd_checkpoint(str(path))
    with pytest.raises(ValueError, match="shape mismatch"):
        build_vae("pong", ch=64).load_sd_checkpoint(str(path))
    with pytest.raises(FileNotFoundError):
        vae.load_sd_checkpoint(str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("name,size", [(n, 32 if n == "sd" else 96) for n in VAE_CONFIGS])  # sd small: fast
@torch.no_grad()
def test_encode_decode_shapes(name, size):
    torch.manual_seed(0)
    vae = build_vae(name).eval()
    x = torch.rand(2, 3, size, size) * 2 - 1
    post = vae.encode(x)
    f = vae.downsample_factor
    assert f == 8
    assert post.mean.shape == post.std.shape == (2, 4, size // f, size // f)
    assert post.kl().shape == (2,)
    assert torch.equal(post.mode(), post.mean)
    g = lambda: torch.Generator().manual_seed(1)
    assert torch.equal(post.sample(g()), post.sample(g()))
    assert vae.decode(post.sample()).shape == x.shape
    assert vae.scaling_factor == VAE_CONFIGS[name]["scaling_factor"]


def test_posterior_clamps_logvar():
    from uvit_vae import DiagonalGaussian

    post = DiagonalGaussian(torch.cat((torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)), dim=1))
    assert post.logvar.max().item() == 20.0
    post = DiagonalGaussian(torch.cat((torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), -100.0)), dim=1))
    assert post.logvar.min().item() == -30.0


@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = build_vae("pong", ch=16, norm_groups=8).eval()
    path = tmp_path / "vae.pt"
    torch.save({"model": vae.state_dict(), "config": vae.config}, path)
    ckpt = torch.load(path, weights_only=True)
    vae2 = AutoencoderKL(**ckpt["config"]).eval()
    vae2.load_state_dict(ckpt["model"])
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    z = vae.encode(x).mode()
    assert torch.equal(z, vae2.encode(x).mode())
    assert torch.equal(vae.decode(z), vae2.decode(z))


def test_bad_norm_groups_is_named():
    with pytest.raises(ValueError, match="norm_groups"):
        build_vae("pong", ch=24, norm_groups=32)
