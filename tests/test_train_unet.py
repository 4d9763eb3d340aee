"""The paper's U-Net: shapes, size check, parameter count, He initialisation, uint8 input."""

import pytest

torch = pytest.importorskip("torch")

from wsiseg_train.unet import (  # noqa: E402
    UNet,
    UNetConfig,
    build_model,
    check_input_size,
    count_parameters,
    size_multiple,
)


def test_default_is_the_papers_net():
    cfg = UNetConfig()
    assert (cfg.width, cfg.depth, cfg.norm, cfg.n_classes) == (32, 5, "none", 13)
    net = UNet(cfg)
    assert count_parameters(net) == 12_821_588  # ~12.8 M as in the design notes
    assert size_multiple(cfg.depth) == 16
    assert [b.convs[1][0].out_channels for b in net.down] == [32, 64, 128, 256, 512]
    # a block's output is its input concatenated to its last feature map
    assert net.down[0].out_channels == 3 + 32


@pytest.mark.parametrize("norm", ["none", "batch", "instance", "group"])
def test_output_shape_and_classes(norm):
    model = build_model(UNetConfig(n_classes=5, width=4, depth=3, norm=norm)).eval()
    x = torch.randint(0, 256, (2, 3, 24, 40), dtype=torch.uint8)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 5, 24, 40) and y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_size_check_names_the_size_to_pad_to():
    with pytest.raises(ValueError, match="multiples of 16 .* pad to 112x384 px"):
        check_input_size(100, 384, 5)
    model = build_model(UNetConfig(n_classes=2, width=4, depth=3))
    with pytest.raises(ValueError, match="pad to 28x32 px"):
        model(torch.zeros(1, 3, 26, 32, dtype=torch.uint8))


def test_he_initialisation():
    torch.manual_seed(0)
    net = UNet(UNetConfig(width=32, depth=3))
    conv = net.down[2].convs[1][0]          # 128 -> 128, fan_in = 128 * 9
    fan_in = conv.in_channels * 9
    assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)
    assert conv.bias.abs().sum().item() == 0


def test_uint8_and_float_inputs_agree():
    model = build_model(UNetConfig(n_classes=3, width=4, depth=2)).eval()
    x = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.float()))


def test_bad_config():
    with pytest.raises(ValueError, match="norm must be one of"):
        UNetConfig(norm="layer")


def test_grey_model_sees_only_luminance():
    """Two inputs with the same BT.601 luminance but different hue give the same logits."""
    model = build_model(UNetConfig(n_classes=3, width=4, depth=2, in_channels=1),
                        colour="grey").eval()
    a = torch.zeros(1, 3, 8, 8)
    a[:, 0] = 200.0                                  # red: luma 0.299 * 200
    b = torch.zeros(1, 3, 8, 8)
    b[:, 1] = 200.0 * 0.299 / 0.587                  # green of the same luma
    with torch.no_grad():
        assert torch.allclose(model(a), model(b), atol=1e-5)
        assert not torch.allclose(model(a), model(a * 0.5), atol=1e-3)


def test_colour_and_channels_must_agree():
    with pytest.raises(ValueError, match="needs in_channels=1"):
        build_model(UNetConfig(n_classes=3, width=4, depth=2), colour="grey")
    with pytest.raises(ValueError, match="colour must be one of"):
        build_model(UNetConfig(n_classes=3, width=4, depth=2), colour="hsv")


def test_folded_upsampling_trains_as_the_plain_form():
    """upsample_conv's transposed convolution gives the same output and the same gradients
    as nearest upsampling + 3x3 convolution (fold on/off), and odd sizes fall back to it."""
    from wsiseg_train.unet import UNet, UNetConfig, upsample_conv

    torch.manual_seed(0)
    net = UNet(UNetConfig(n_classes=3, width=4, depth=3, norm="batch")).train()
    x = torch.randn(2, 3, 32, 48)
    outs, grads = [], []
    for fold in (True, False):
        net.fold = fold
        net.zero_grad()
        y = net(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([p.grad.clone() for p in net.parameters()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    unit = net.up_convs[0]
    small = torch.randn(1, unit[0].in_channels, 5, 7)
    odd = upsample_conv(unit.eval(), small, torch.Size((11, 15)))
    assert odd.shape[-2:] == (11, 15)
