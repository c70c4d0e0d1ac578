"""Tests of the shared components: block families, OCBE, mirror decoder, cosine distances and anomaly maps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from distillad.backbones import create_encoder
from distillad.components import (
    BlockFamily,
    FrozenFeatureCache,
    MirrorDecoder,
    MultiScaleAnomalyMap,
    OneClassBottleneck,
    UpsamplingResidualBlock,
    block_family,
    cosine_distance_map,
    flattened_cosine_distance,
    gaussian_smoothing,
    upsampled_sum,
)


def pixels(*vectors: tuple[float, ...]) -> torch.Tensor:
    """Feature vectors laid out in one row: a (1, C, 1, N) map, float64."""
    return torch.tensor(vectors, dtype=torch.float64).T.reshape(1, len(vectors[0]), 1, len(vectors))


# --- block families ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoders() -> dict[str, nn.Module]:
    return {name: create_encoder(name, pretrained=False) for name in ("tf_efficientnet_lite0", "resnet18", "wide_resnet50_2")}


def test_block_family_wide_resnet50_2(encoders: dict[str, nn.Module]) -> None:
    family = block_family(encoders["wide_resnet50_2"])
    assert family == BlockFamily(bottleneck=True, base_width=128, depths=(3, 4, 6))
    assert family.expansion == 4


def test_block_family_resnet18_and_generic(encoders: dict[str, nn.Module]) -> None:
    assert block_family(encoders["resnet18"]) == BlockFamily(bottleneck=False, base_width=64, depths=(2, 2, 2))
    assert block_family(encoders["resnet18"]).expansion == 1
    assert block_family(encoders["tf_efficientnet_lite0"]) == BlockFamily()


def test_block_family_resnet50_has_base_width_64() -> None:
    family = block_family(create_encoder("resnet50", pretrained=False))
    assert (family.bottleneck, family.base_width, family.depths) == (True, 64, (3, 4, 6))


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18", "wide_resnet50_2"])
def test_bottleneck_and_decoder_match_teacher_shapes(name: str, encoders: dict[str, nn.Module]) -> None:
    torch.manual_seed(0)
    encoder = encoders[name].eval()
    family, channels = block_family(encoder), encoder.channels
    bottleneck = OneClassBottleneck(channels[:3], channels[3], family).eval()
    decoder = MirrorDecoder(channels[3], channels[:3], family).eval()
    with torch.no_grad():
        teacher = encoder(torch.rand(2, 3, 64, 64))
        embedding = bottleneck(teacher[:3])
        student = decoder(embedding)
    assert embedding.shape == teacher[3].shape  # OCBE: stride 32, the teacher's stage-4 width
    assert [s.shape for s in student] == [t.shape for t in teacher[:3]]
    assert all(torch.isfinite(s).all() for s in student)


def test_wide_resnet_blocks_follow_the_official_rd_code(encoders: dict[str, nn.Module]) -> None:
    # Official RD (wide_resnet50_2): OCE = 3 Bottlenecks, planes 512, width 512*128/64 = 1024, input 3*1024;
    # decoder levels 1024/512/256 channels with 3/4/6 de-blocks, the first one widened by base_width 128.
    encoder = encoders["wide_resnet50_2"]
    family, channels = block_family(encoder), encoder.channels
    bottleneck = OneClassBottleneck(channels[:3], channels[3], family)
    assert len(bottleneck.embed) == 3 and all(isinstance(b, Bottleneck) for b in bottleneck.embed)
    first = bottleneck.embed[0]
    assert (first.conv1.in_channels, first.conv1.out_channels, first.conv3.out_channels) == (3072, 1024, 2048)
    assert first.conv2.stride == (2, 2)
    decoder = MirrorDecoder(channels[3], channels[:3], family)
    blocks_per_level = []
    for level in decoder.levels:
        upsample, refine = level
        assert isinstance(upsample, UpsamplingResidualBlock)
        blocks_per_level.append(1 + (len(refine) if isinstance(refine, nn.Sequential) else 0))
    assert blocks_per_level == [3, 4, 6]
    first_up = decoder.levels[0][0].body
    assert (first_up[0].in_channels, first_up[0].out_channels, first_up[-2].out_channels) == (2048, 512, 1024)
    assert isinstance(first_up[3], nn.ConvTranspose2d) and first_up[3].stride == (2, 2)


def test_generic_family_uses_basic_blocks() -> None:
    family = BlockFamily()
    bottleneck = OneClassBottleneck([24, 40, 112], 320, family, depth=3)
    assert all(isinstance(b, BasicBlock) for b in bottleneck.embed) and len(bottleneck.embed) == 3
    decoder = MirrorDecoder(320, [24, 40, 112], family)
    assert [len(level[1]) + 1 for level in decoder.levels] == [2, 2, 2]


# --- cosine distances -------------------------------------------------------------------------------------


def test_cosine_distance_map_hand_values() -> None:
    teacher = pixels((1.0, 0.0), (1.0, 2.0), (3.0, -1.0), (1.0, 1.0))
    student = pixels((0.0, 5.0), (2.0, 4.0), (-3.0, 1.0), (1.0, 0.0))  # orthogonal, identical direction, opposite, 45°
    result = cosine_distance_map(teacher, student)
    assert result.shape == (1, 1, 1, 4)
    expected = torch.tensor([1.0, 0.0, 2.0, 1 - 1 / math.sqrt(2)], dtype=torch.float64).view(1, 1, 1, 4)
    torch.testing.assert_close(result, expected)


def test_cosine_distances_are_float32_from_bfloat16_features() -> None:
    """Near 1 a bfloat16 cosine resolves only 2^-8: distances of bfloat16 features are taken in float32."""
    torch.manual_seed(0)
    teacher = torch.randn(2, 64, 4, 4)
    student = (teacher + 0.01 * torch.randn_like(teacher)).bfloat16()
    teacher = teacher.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distance = cosine_distance_map(teacher, student)
        flat = flattened_cosine_distance(teacher, student)
    assert distance.dtype == flat.dtype == torch.float32
    torch.testing.assert_close(distance, cosine_distance_map(teacher.float(), student.float()))
    torch.testing.assert_close(flat, flattened_cosine_distance(teacher.float(), student.float()))


def test_cosine_distance_map_is_per_sample_and_per_pixel() -> None:
    teacher = torch.zeros(2, 3, 2, 2, dtype=torch.float64)
    teacher[:, 0] = 1
    student = teacher.clone()
    student[1, :, 0, 1] = torch.tensor([0.0, 1.0, 0.0])  # only sample 1, pixel (0, 1) turns orthogonal
    result = cosine_distance_map(teacher, student)
    expected = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    expected[1, 0, 0, 1] = 1
    torch.testing.assert_close(result, expected)


def test_flattened_cosine_distance_hand_value() -> None:
    # Pixel 1: (1, 0) vs (0, 1) orthogonal; pixel 2: (0, 10) vs (0, 10) identical. Per-pixel mean = 0.5, but the
    # flattened vectors (1, 0, 0, 10) and (0, 0, 1, 10) have cosine 100/101: the large activation dominates.
    teacher = pixels((1.0, 0.0), (0.0, 10.0))
    student = pixels((0.0, 1.0), (0.0, 10.0))
    torch.testing.assert_close(flattened_cosine_distance(teacher, student), torch.tensor([1 / 101], dtype=torch.float64))
    torch.testing.assert_close(cosine_distance_map(teacher, student).mean(), torch.tensor(0.5, dtype=torch.float64))


def test_flattened_cosine_distance_per_sample() -> None:
    teacher = torch.stack([pixels((1.0, 0.0))[0], pixels((1.0, 0.0))[0]])
    student = torch.stack([pixels((1.0, 0.0))[0], pixels((-2.0, 0.0))[0]])
    torch.testing.assert_close(flattened_cosine_distance(teacher, student), torch.tensor([0.0, 2.0], dtype=torch.float64))


# --- multi-scale anomaly map ------------------------------------------------------------------------------


def test_upsampled_sum_of_constant_levels_and_bilinear_values() -> None:
    constant = upsampled_sum([torch.full((1, 1, 4, 4), 1.0), torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 1, 1), 2.0)],
                             (8, 8))
    torch.testing.assert_close(constant, torch.full((1, 1, 8, 8), 3.5))
    # bilinear, align_corners=False: [0, 1] doubled -> [0, 0.25, 0.75, 1]
    ramp = upsampled_sum([torch.tensor([[[[0.0, 1.0]]]])], (2, 4))
    torch.testing.assert_close(ramp, torch.tensor([[0.0, 0.25, 0.75, 1.0]] * 2).view(1, 1, 2, 4))


def test_multiscale_map_without_smoothing_equals_hand_sum() -> None:
    # Level 1 (4x4): all orthogonal -> 1; level 2 (2x2): identical -> 0; level 3 (1x2): identical left, opposite right.
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    teacher = [e0.view(1, 2, 1, 1).expand(1, 2, 4, 4), e0.view(1, 2, 1, 1).expand(1, 2, 2, 2),
               e0.view(1, 2, 1, 1).expand(1, 2, 1, 2)]
    student = [e1.view(1, 2, 1, 1).expand(1, 2, 4, 4), 3 * e0.view(1, 2, 1, 1).expand(1, 2, 2, 2),
               torch.stack([e0, -e0], dim=1).view(1, 2, 1, 2)]
    result = MultiScaleAnomalyMap(sigma=0)(teacher, student, (2, 4))
    # level 3 is [0, 2] -> bilinear [0, 0.5, 1.5, 2]; plus 1 from level 1, plus 0 from level 2
    expected = torch.tensor([[1.0, 1.5, 2.5, 3.0]] * 2).view(1, 1, 2, 4)
    torch.testing.assert_close(result, expected)


def test_multiscale_map_without_smoothing_equals_summed_interpolations_on_random_features() -> None:
    torch.manual_seed(0)
    teacher = [torch.randn(2, 5, 16 // s, 16 // s) for s in (1, 2, 4)]
    student = [torch.randn(2, 5, 16 // s, 16 // s) for s in (1, 2, 4)]
    result = MultiScaleAnomalyMap(sigma=0)(teacher, student, (32, 32))
    expected = torch.zeros(2, 1, 32, 32)
    for t, s in zip(teacher, student):
        distance = 1 - (t * s).sum(1, keepdim=True) / (t.norm(dim=1, keepdim=True) * s.norm(dim=1, keepdim=True))
        expected += F.interpolate(distance, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_gaussian_smoothing_spreads_a_spike_by_the_discrete_gaussian() -> None:
    assert isinstance(gaussian_smoothing(0), nn.Identity)
    sigma = 2.0
    spike = torch.zeros(1, 1, 41, 41)
    spike[0, 0, 20, 20] = 1.0
    smoothed = gaussian_smoothing(sigma)(spike)
    # normalised 1-D kernel of 2*round(4 sigma)+1 = 17 taps; the 2-D filter is separable
    radius = 8
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2 / (2 * sigma**2))
    taps = taps / taps.sum()
    expected = torch.zeros(41, 41, dtype=torch.float64)
    expected[20 - radius : 20 + radius + 1, 20 - radius : 20 + radius + 1] = torch.outer(taps, taps)
    torch.testing.assert_close(smoothed[0, 0].double(), expected, rtol=1e-4, atol=1e-6)
    assert float(smoothed.sum()) == pytest.approx(1.0, abs=1e-5)  # mass preserved away from the border


def test_multiscale_map_smoothing_lowers_a_single_spike() -> None:
    teacher = [torch.zeros(1, 2, 32, 32)]
    teacher[0][:, 0] = 1
    student = [teacher[0].clone()]
    student[0][0, :, 16, 16] = torch.tensor([0.0, 1.0])  # one orthogonal pixel: a spike of height 1
    sharp = MultiScaleAnomalyMap(sigma=0)(teacher, student, (32, 32))
    smooth = MultiScaleAnomalyMap(sigma=4)(teacher, student, (32, 32))
    assert float(sharp.max()) == pytest.approx(1.0)
    assert float(smooth.max()) < 0.05  # 1 / (2 pi 16) ~ 0.01
    assert tuple(torch.nonzero(smooth[0, 0] == smooth.max())[0].tolist()) == (16, 16)
    assert float(smooth.sum()) == pytest.approx(float(sharp.sum()), rel=1e-3)


# --- frozen-teacher feature cache -----------------------------------------------------------------


def test_teacher_features_do_not_depend_on_the_rest_of_the_batch() -> None:
    """What makes caching per image exact: an image's features are bitwise the same in any batch."""
    from distillad.models.base import channels_last

    encoder = channels_last(create_encoder("tf_efficientnet_lite0").eval())
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = encoder(images)
        alone = encoder(images[3:4])
        pair = encoder(images[[4, 1]])
    for level, single, two in zip(together, alone, pair):
        assert torch.equal(level[3:4], single)
        assert torch.equal(level[[4, 1]], two)


def test_feature_cache_encodes_each_image_once_and_returns_the_same_features() -> None:
    calls = []

    def encode(images: torch.Tensor) -> list[torch.Tensor]:
        calls.append(len(images))
        return [images * 2, images.mean(dim=1, keepdim=True)]

    cache = FrozenFeatureCache()
    images = torch.rand(4, 3, 8, 8)
    first = cache(encode, images)
    assert calls == [4]
    shuffled = images[[2, 0, 3, 1]]
    again = cache(encode, shuffled)
    assert calls == [4]  # every image was seen
    for cached, direct in zip(again, encode(shuffled)):
        assert torch.equal(cached, direct)
    calls.clear()
    changed = images.clone()
    changed[1, 0, 0, 0] += 0.5  # an augmented or synthesised image: other pixels, another entry
    cache(encode, changed)
    assert calls == [1] and len(cache) == 5
    assert [f.shape for f in first] == [(4, 3, 8, 8), (4, 1, 8, 8)]


def test_feature_cache_keeps_to_its_budget() -> None:
    calls = []

    def encode(images: torch.Tensor) -> list[torch.Tensor]:
        calls.append(len(images))
        return [images.clone()]

    images = torch.rand(4, 3, 16, 16)  # 3 KiB of features an image
    cache = FrozenFeatureCache(budget_mb=7 / 1024)
    cache(encode, images)
    cache(encode, images)
    assert len(cache) == 2 and calls == [4, 2]
    disabled = FrozenFeatureCache(budget_mb=0)
    disabled(encode, images)
    assert len(disabled) == 0
