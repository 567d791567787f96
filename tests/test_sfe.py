"""StyleFeatureEditor: the generator's feature access (official `return_features` / `new_features` / `early_stop`),
the SFE networks, their checkpoints and the invert/edit/decode path, on tiny official-format files."""
import pytest
import torch

from hyperstyle_nodes.stylegan2.generator import feature_layer
from hyperstyle_nodes.tiny import make_generator, tiny_generator_config


def official_order_reference(g, codes, new_features=None):
    """The official StyleGAN2 loop written out with our layer modules: every activation in `return_features` order
    ([constant input, conv1, then per resolution upsampling conv, conv]), with `new_features[k]` replacing entry k
    where the next convolution reads it (`insert_feature`, feature_scale 1)."""
    new_features = new_features or {}
    styles = g.styles(codes)
    noises = [getattr(g.noises, f"noise_{i}") for i in range(g.config.n_noises)]
    outs = [g.input(codes.shape[0])]
    out = g.conv1(outs[0], styles[0], noises[0])
    outs.append(out)
    skip = g.to_rgb1(out, styles[1])
    k = 1
    for j, to_rgb in enumerate(g.to_rgbs):
        out = new_features.get(k, out)
        out = g.convs[2 * j](out, styles[2 + 3 * j], noises[1 + 2 * j])
        outs.append(out)
        out = new_features.get(k + 1, out)
        out = g.convs[2 * j + 1](out, styles[3 + 3 * j], noises[2 + 2 * j])
        outs.append(out)
        skip = to_rgb(out, styles[4 + 3 * j], skip)
        k += 2
    return skip, outs


@pytest.fixture(scope="module")
def generator():
    return make_generator(tiny_generator_config(128), seed=3)


def test_feature_index_maps_to_the_layer_numbering_at_any_size():
    assert [feature_layer(k) for k in range(1, 8)] == [0, 2, 3, 5, 6, 8, 9]
    assert make_generator(tiny_generator_config(64), seed=0).n_features == 10  # 4 px: input, conv1; 8..64 px: two each
    full = tiny_generator_config(1024, narrow=1)
    # the released SFE reads entry 9: the 64-px conv's output, 512 channels at 1024 px
    layer = feature_layer(9)
    assert full.layer_shapes[layer][2] == 512 and 4 << ((layer + 1) // 3) == 64


@torch.no_grad()
def test_features_and_replacement_follow_the_official_order(generator):
    codes = torch.randn(2, generator.n_styles, generator.style_dim)
    image, outs = official_order_reference(generator, codes)
    torch.testing.assert_close(generator(codes), image, rtol=0, atol=1e-5)
    for k in range(1, generator.n_features):
        feature = generator.feature(codes, k)
        assert tuple(feature.shape[1:]) == (generator.feature_shape(k)[0],) + (generator.feature_shape(k)[1],) * 2
        torch.testing.assert_close(feature, outs[k], rtol=0, atol=1e-5)
    for k in (1, 4, 9):  # an upsampling conv's output and a conv's output (9: the one SFE replaces)
        new = torch.randn_like(outs[k])
        expected, _ = official_order_reference(generator, codes, {k: new})
        replaced = generator(codes, new_features={k: new})
        torch.testing.assert_close(replaced, expected, rtol=0, atol=1e-5)
        assert (replaced - image).abs().max() > 1e-3
        # its own activation back in changes nothing
        torch.testing.assert_close(generator(codes, new_features={k: generator.feature(codes, k)}), image,
                                   rtol=0, atol=1e-6)
    styles = generator.styles(codes)
    torch.testing.assert_close(generator.synthesis_feature(styles, 9), generator.feature(codes, 9), rtol=0, atol=0)


def test_feature_requests_out_of_range_or_of_the_wrong_shape_are_refused(generator):
    codes = torch.randn(1, generator.n_styles, generator.style_dim)
    with pytest.raises(ValueError, match="outside"):
        generator.feature(codes, generator.n_features)
    with pytest.raises(ValueError, match="last activation"):
        generator(codes, new_features={generator.n_features - 1: generator.feature(codes, generator.n_features - 1)})
    with pytest.raises(ValueError, match=r"should have shape \[1, "):
        generator(codes, new_features={9: torch.zeros(1, 3, 64, 64)})
