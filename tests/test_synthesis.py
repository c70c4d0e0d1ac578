"""Tests for distillad.synthesis: Perlin masks, textures, foregrounds, caching and the synthesizer."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from distillad.errors import DistilladError
from distillad.synthesis import (
    FOREGROUND_MODES,
    PROCEDURAL_TEXTURES,
    AnomalySynthesizer,
    BuiltinTextures,
    FolderTextures,
    ForegroundCache,
    compute_foreground,
    make_texture_source,
    perlin_mask,
    to_uint8_rgb,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZE = 96


def disc_image(size: int = SIZE, radius: int = 28, centre: tuple[int, int] | None = None, dark_on_bright=False):
    """A (3, size, size) float image in [0, 1]: a bright disc on black (or a dark disc on white)."""
    image = np.full((size, size, 3), 255 if dark_on_bright else 0, np.uint8)
    centre = centre or (size // 2, size // 2)
    cv2.circle(image, centre, radius, (20, 20, 20) if dark_on_bright else (200, 190, 210), -1)
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0


def disc_region(size: int, radius: float, centre: tuple[int, int] | None = None) -> torch.Tensor:
    cx, cy = centre or (size // 2, size // 2)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((rows - cy) ** 2 + (cols - cx) ** 2) <= radius**2


# --- Perlin masks ---------------------------------------------------------------------------------


def test_perlin_mask_is_binary_non_empty_and_seeded():
    generator = torch.Generator().manual_seed(0)
    masks = [perlin_mask(64, 80, generator) for _ in range(12)]
    for mask in masks:
        assert mask.shape == (64, 80) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert mask.sum() > 0
    assert not all(torch.equal(masks[0], other) for other in masks[1:])
    again = torch.Generator().manual_seed(0)
    assert all(torch.equal(mask, perlin_mask(64, 80, again)) for mask in masks)
    other = torch.Generator().manual_seed(1)
    assert not torch.equal(masks[0], perlin_mask(64, 80, other))


def test_perlin_mask_falls_back_to_an_ellipse_when_noise_never_passes_the_threshold():
    mask = perlin_mask(64, 64, torch.Generator().manual_seed(3), threshold=10.0)
    assert mask.sum() > 0
    assert mask.mean() < 0.5


def test_perlin_mask_leaves_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    perlin_mask(64, 64, torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(5), expected)


def test_perlin_mask_rejects_bad_scales():
    with pytest.raises(DistilladError, match="min_scale_exp"):
        perlin_mask(32, 32, torch.Generator(), min_scale_exp=4, max_scale_exp=4)


# --- foregrounds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["grabcut", "threshold"])
@pytest.mark.parametrize("dark_on_bright", [False, True])
def test_foreground_of_a_disc_is_the_disc(mode, dark_on_bright):
    radius = 28
    foreground = ForegroundCache(mode).compute(disc_image(radius=radius, dark_on_bright=dark_on_bright))
    assert foreground.dtype == torch.bool and foreground.shape == (SIZE, SIZE)
    assert not (foreground & ~disc_region(SIZE, radius + 1.5)).any(), "foreground leaks outside the disc"
    inner = disc_region(SIZE, radius - 2)
    assert foreground[inner].float().mean() > 0.95, "foreground misses the disc"


def test_threshold_picks_the_central_object_even_when_it_touches_three_borders():
    # Like the battery welds: a bright part filling the frame except a dark strip on the left. The bright
    # side touches more of the border than the dark one, yet it is the object.
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[:, 20:] = 220
    foreground = compute_foreground(image, "threshold")
    assert foreground[:, 24:].all() and not foreground[:, :16].any()


def test_blank_image_falls_back_to_the_whole_image():
    blank = torch.zeros(3, 64, 64)
    for mode in FOREGROUND_MODES:
        assert ForegroundCache(mode).compute(blank).all()
    raw = to_uint8_rgb(blank)
    assert not FOREGROUND_MODES["threshold"](raw).any()
    assert not FOREGROUND_MODES["grabcut"](raw).any()


def test_fraction_fallback_rule():
    image = np.zeros((128, 128, 3), np.uint8)
    image[60:72, 60:72] = 255  # 144 px = 0.9 % of the image
    assert compute_foreground(image, "threshold").all(), "a 0.9 % foreground must fall back (min 2 %)"
    small = compute_foreground(image, "threshold", min_fraction=0.001)
    outside = np.ones((128, 128), dtype=bool)
    outside[59:73, 59:73] = False
    assert small[62:70, 62:70].all() and not small[outside].any()  # the square, corners rounded by cleanup


def test_nearly_full_foreground_falls_back(monkeypatch):
    coverage = {"rows": 0}

    def partial(image):
        mask = np.ones(image.shape[:2], dtype=bool)
        mask[: coverage["rows"]] = False
        return mask

    monkeypatch.setitem(FOREGROUND_MODES, "threshold", partial)
    image = np.zeros((100, 100, 3), np.uint8)
    coverage["rows"] = 3  # 97 % > 95 %
    assert compute_foreground(image, "threshold").all()
    coverage["rows"] = 10  # 90 %
    assert compute_foreground(image, "threshold").sum() == 9000


def test_unknown_foreground_mode_lists_the_valid_ones():
    with pytest.raises(DistilladError, match="grabcut, none, threshold"):
        ForegroundCache("otsu")
    with pytest.raises(DistilladError, match="'otsu'"):
        AnomalySynthesizer(foreground="otsu")


def test_foreground_cache_computes_once_per_key_and_size(monkeypatch):
    calls = []
    original = FOREGROUND_MODES["threshold"]

    def counting(image):
        calls.append(image.shape)
        return original(image)

    monkeypatch.setitem(FOREGROUND_MODES, "threshold", counting)
    cache = ForegroundCache("threshold", cache_dir=None)
    image = disc_image()
    first = cache.get("a.png", image)
    assert torch.equal(cache.get("a.png", image), first)
    assert len(calls) == 1
    cache.get("b.png", image)
    assert len(calls) == 2
    small = torch.nn.functional.interpolate(image[None], size=(64, 64), mode="bilinear")[0]
    assert cache.get("a.png", small).shape == (64, 64)
    assert len(calls) == 3 and len(cache) == 3
    assert torch.equal(first, ForegroundCache("threshold").compute(image))


def test_foreground_cache_on_disk_serves_another_run_and_survives_a_bad_file(monkeypatch, tmp_path):
    image = disc_image()
    first = ForegroundCache("grabcut", cache_dir=tmp_path).get("a.png", image)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1

    def fail(image):
        raise AssertionError("GrabCut ran although the foreground was on disk")

    monkeypatch.setitem(FOREGROUND_MODES, "grabcut", fail)
    assert torch.equal(ForegroundCache("grabcut", cache_dir=tmp_path).get("renamed.png", image), first)
    monkeypatch.undo()
    calls = []
    original = FOREGROUND_MODES["grabcut"]
    monkeypatch.setitem(FOREGROUND_MODES, "grabcut", lambda image: calls.append(1) or original(image))
    ForegroundCache("grabcut", cache_dir=tmp_path, min_fraction=0.1).get("a.png", image)  # other settings
    assert len(calls) == 1 and len(list(tmp_path.glob("*.npy"))) == 2
    files[0].write_bytes(b"truncated")
    assert torch.equal(ForegroundCache("grabcut", cache_dir=tmp_path).get("a.png", image), first)
    assert len(calls) == 2


def test_synthesizer_caches_foregrounds_only_with_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILLAD_CACHE_DIR", str(tmp_path))
    calls = []
    original = FOREGROUND_MODES["threshold"]
    monkeypatch.setitem(FOREGROUND_MODES, "threshold", lambda image: calls.append(1) or original(image))
    images = torch.stack([disc_image(), disc_image(radius=20)])
    synthesizer = AnomalySynthesizer(foreground="threshold")
    for _ in range(3):
        synthesizer(images, keys=["a.png", "b.png"])
    assert len(calls) == 2
    synthesizer(images)
    synthesizer(images)
    assert len(calls) == 6


# --- textures -------------------------------------------------------------------------------------


def test_folder_textures_reads_images_recursively(tmp_path):
    (tmp_path / "banded" / "deep").mkdir(parents=True)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / "banded" / "a.png"), rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    cv2.imwrite(str(tmp_path / "banded" / "deep" / "b.JPG"), rng.integers(0, 255, (70, 30, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    source = make_texture_source(tmp_path)
    assert isinstance(source, FolderTextures) and len(source.paths) == 2
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        texture = source.sample(48, 64, generator, None)
        assert texture.shape == (3, 48, 64) and texture.dtype == torch.float32
        assert texture.min() >= 0 and texture.max() <= 1 and texture.std() > 0.01


def test_folder_textures_errors(tmp_path):
    with pytest.raises(DistilladError, match=r"texture_dir .* not a folder"):
        FolderTextures(tmp_path / "missing")
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DistilladError, match=r"texture_dir .* holds no images"):
        FolderTextures(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DistilladError, match=r"broken\.png cannot be read"):
        FolderTextures(tmp_path).sample(32, 32, torch.Generator(), None)


def _constant_per_channel(texture: torch.Tensor) -> bool:
    return bool((texture.flatten(1).std(dim=1) < 1e-6).all())


def test_builtin_textures_without_pool_are_procedural():
    source = make_texture_source(None)
    assert isinstance(source, BuiltinTextures)
    generator = torch.Generator().manual_seed(0)
    for name, make in PROCEDURAL_TEXTURES.items():
        texture = make(48, 64, generator)
        assert texture.shape == (3, 48, 64), name
        assert texture.min() >= 0 and texture.max() <= 1, name
    textures = [source.sample(48, 64, generator, None) for _ in range(20)]
    assert all(t.shape == (3, 48, 64) and t.min() >= 0 and t.max() <= 1 for t in textures)
    assert not any(_constant_per_channel(t) for t in textures)


def test_builtin_textures_use_crops_of_the_pool():
    # Constant pool images give per-channel constant crops (jitter and inversion keep them constant),
    # which no procedural texture is.
    pool = torch.full((3, 3, 40, 40), 0.3)
    generator = torch.Generator().manual_seed(0)
    textures = [BuiltinTextures().sample(48, 64, generator, pool) for _ in range(20)]
    assert all(t.shape == (3, 48, 64) and t.min() >= 0 and t.max() <= 1 for t in textures)
    from_pool = sum(_constant_per_channel(t) for t in textures)
    assert 0 < from_pool < 20


# --- synthesizer ----------------------------------------------------------------------------------


def disc_batch() -> tuple[torch.Tensor, torch.Tensor]:
    centres = [(48, 48), (36, 40), (60, 56), (44, 60)]
    images = torch.stack([disc_image(radius=24, centre=c) for c in centres])
    regions = torch.stack([disc_region(SIZE, 25.5, c) for c in centres])
    return images, regions


@pytest.mark.parametrize("mode", ["grabcut", "threshold"])
def test_anomalies_lie_inside_the_foreground(mode):
    images, discs = disc_batch()
    result = AnomalySynthesizer(foreground=mode, seed=0)(images, keys=[f"{i}.png" for i in range(4)])
    assert result.normal is images
    assert result.anomalous.shape == images.shape and result.mask.shape == (4, 1, SIZE, SIZE)
    mask = result.mask[:, 0].bool()
    assert set(result.mask.unique().tolist()) == {0.0, 1.0}
    assert mask.flatten(1).any(dim=1).all(), "every sample gets a non-empty anomaly"
    assert not (mask & ~discs).any(), "anomaly outside the disc"
    outside = ~mask[:, None].expand_as(images)
    assert torch.equal(result.anomalous[outside], images[outside])
    assert (result.anomalous - images).abs().amax(dim=1)[mask].gt(1e-3).float().mean() > 0.5
    assert result.anomalous.min() >= 0 and result.anomalous.max() <= 1


def test_foreground_none_uses_the_whole_image():
    images, discs = disc_batch()
    result = AnomalySynthesizer(foreground="none", seed=2)(images.repeat(2, 1, 1, 1))
    assert (result.mask[:, 0].bool() & ~discs.repeat(2, 1, 1)).any()


def test_synthesis_is_reproducible_and_seed_dependent():
    images, _ = disc_batch()
    first, second = AnomalySynthesizer(foreground="threshold", seed=7), AnomalySynthesizer("threshold", seed=7)
    a1, a2 = first(images), first(images)
    b1, b2 = second(images), second(images)
    for x, y in ((a1, b1), (a2, b2)):
        assert torch.equal(x.anomalous, y.anomalous) and torch.equal(x.mask, y.mask)
    assert not torch.equal(a1.mask, a2.mask), "successive calls must differ"
    other = AnomalySynthesizer(foreground="threshold", seed=8)(images)
    assert not torch.equal(other.mask, a1.mask)


def test_synthesis_leaves_global_rng_untouched():
    images, _ = disc_batch()
    synthesizer = AnomalySynthesizer(foreground="grabcut", seed=0)
    torch.manual_seed(5)
    expected = torch.rand(8)
    torch.manual_seed(5)
    synthesizer(images)
    assert torch.equal(torch.rand(8), expected)


def test_anomaly_probability():
    images = disc_image()[None].repeat(16, 1, 1, 1)
    never = AnomalySynthesizer(foreground="none", anomaly_probability=0.0)(images)
    assert never.mask.sum() == 0 and torch.equal(never.anomalous, images)
    half = AnomalySynthesizer(foreground="none", anomaly_probability=0.5, seed=1)(images)
    anomalous = half.mask.flatten(1).any(dim=1)
    assert 0 < anomalous.sum() < 16
    assert torch.equal(half.anomalous[~anomalous], images[~anomalous])


def test_beta_is_the_opacity_of_the_original_image(tmp_path):
    # A black texture stays black under the jitter, or turns white when inverted: inside the mask,
    # anomalous = beta * image + (1 - beta) * t with t all 0 or all 1.
    cv2.imwrite(str(tmp_path / "black.png"), np.zeros((32, 32, 3), np.uint8))
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for beta in (0.0, 0.5):
        result = AnomalySynthesizer("none", texture_dir=tmp_path, beta_range=(beta, beta), seed=3)(images)
        for image, anomalous, mask in zip(images, result.anomalous, result.mask, strict=True):
            inside = mask.expand_as(image).bool()
            texture = (anomalous[inside] - beta * image[inside]) / (1 - beta)
            assert texture.max() - texture.min() < 1e-5
            assert min(abs(texture.mean().item()), abs(texture.mean().item() - 1)) < 1e-5
    opaque = AnomalySynthesizer("none", texture_dir=tmp_path, beta_range=(1.0, 1.0))(images)
    assert opaque.mask.sum() > 0 and torch.allclose(opaque.anomalous, images, atol=1e-6)


def test_invalid_options_raise_distillad_errors():
    with pytest.raises(DistilladError, match="beta_range"):
        AnomalySynthesizer(beta_range=(0.5, 0.2))
    with pytest.raises(DistilladError, match="anomaly_probability"):
        AnomalySynthesizer(anomaly_probability=1.5)
    with pytest.raises(DistilladError, match="texture_dir"):
        AnomalySynthesizer(texture_dir="/nonexistent/dtd")


def test_dtype_and_device_follow_the_images():
    images, _ = disc_batch()
    result = AnomalySynthesizer(foreground="threshold")(images.double())
    assert result.anomalous.dtype == torch.float64 and result.mask.dtype == torch.float64
    if torch.cuda.is_available():
        on_gpu = AnomalySynthesizer(foreground="threshold")(images.cuda())
        assert on_gpu.anomalous.is_cuda and on_gpu.mask.is_cuda
        assert torch.allclose(on_gpu.anomalous.cpu(), AnomalySynthesizer(foreground="threshold")(images).anomalous)


@pytest.mark.skipif(not (DATA / "weld" / "train" / "good").is_dir(), reason=f"real data not found at {DATA}")
@pytest.mark.parametrize("mode", ["grabcut", "threshold"])
def test_real_weld_images(mode):
    paths = sorted((DATA / "weld" / "train" / "good").glob("*.png"))[:2]
    images = torch.stack(
        [
            torch.from_numpy(cv2.cvtColor(cv2.resize(cv2.imread(str(p)), (128, 128)), cv2.COLOR_BGR2RGB))
            .permute(2, 0, 1)
            .float()
            / 255.0
            for p in paths
        ]
    )
    keys = [str(p) for p in paths]
    synthesizer = AnomalySynthesizer(foreground=mode, seed=0)
    result = synthesizer(images, keys=keys)
    assert result.mask.shape == (2, 1, 128, 128)
    for key, image, mask in zip(keys, images, result.mask[:, 0].bool(), strict=True):
        foreground = synthesizer.foregrounds.get(key, image)
        assert mask.any() and not (mask & ~foreground).any()
    unchanged = ~result.mask.bool().expand_as(images)
    assert torch.equal(result.anomalous[unchanged], images[unchanged])


class _RecordingTextures:
    """A texture source that remembers the pool it was offered for each sample."""

    def __init__(self) -> None:
        self.pools: list[torch.Tensor] = []

    def sample(self, height: int, width: int, generator: torch.Generator, pool: torch.Tensor | None = None):
        del generator
        self.pools.append(pool)
        return torch.zeros(3, height, width)


def test_batch_textures_never_come_from_the_image_being_corrupted() -> None:
    from distillad.synthesis import AnomalySynthesizer

    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 16, 16) / 4
    synthesizer = AnomalySynthesizer(foreground="none", seed=0)
    synthesizer.textures = _RecordingTextures()
    synthesizer(images)
    assert len(synthesizer.textures.pools) == 4
    for index, pool in enumerate(synthesizer.textures.pools):
        others = [image for position, image in enumerate(images) if position != index]
        assert len(pool) == 3 and all(torch.equal(a, b) for a, b in zip(pool, others, strict=True))
        assert torch.equal(pool[-1], others[-1])
        with pytest.raises(IndexError):
            pool[3]


def test_whole_image_share_counts_foregrounds_that_fell_back() -> None:
    from distillad.synthesis import ForegroundCache

    rng = np.random.default_rng(0)
    texture = torch.from_numpy(rng.random((3, 64, 64), dtype=np.float32))  # fills the frame: GrabCut falls back
    scene = torch.full((3, 64, 64), 0.1)
    scene[:, 16:48, 16:48] = 0.9  # an object inside a plain background
    cache = ForegroundCache("grabcut", cache_dir=None)
    assert cache.whole_image_share() is None
    cache.get("texture", texture)
    assert cache.whole_image_share() == 1.0
    cache.get("scene", scene)
    assert cache.whole_image_share() == 0.5
