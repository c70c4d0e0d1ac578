"""Frozen BatchNorm folded into the convolution before it (distillad.folding)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import distillad.backbones as backbones
from distillad.backbones import create_encoder
from distillad.folding import FoldedBatchNorm2d, FoldedBatchNormAct2d, FoldedConv2d, fold_batchnorms

FOLDED_TYPES = (FoldedBatchNorm2d, FoldedBatchNormAct2d)


def unfolded_encoder(name: str, monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    with monkeypatch.context() as patch:
        patch.setattr(backbones, "fold_batchnorms", lambda *args, **kwargs: 0)
        return create_encoder(name, pretrained=name == "tf_efficientnet_lite0")


def pair(name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    folded = create_encoder(name, pretrained=name == "tf_efficientnet_lite0")
    torch.manual_seed(0)
    return folded, unfolded_encoder(name, monkeypatch)


@pytest.mark.parametrize(("name", "batchnorms"), [("tf_efficientnet_lite0", 48), ("resnet18", 20)])
def test_every_batchnorm_is_folded_and_the_state_dict_keeps_its_keys(name: str, batchnorms: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folded, plain = pair(name, monkeypatch)
    assert sum(isinstance(m, FOLDED_TYPES) for m in folded.modules()) == batchnorms
    assert not any(isinstance(m, FOLDED_TYPES) for m in plain.modules())
    assert list(folded.state_dict()) == list(plain.state_dict())
    assert [m.training for m in folded.modules()] == [m.training for m in plain.modules()]
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(folded.eval()(images), plain.eval()(images)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_gradients_reach_convolution_and_batchnorm_parameters_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """DMDD's student: BatchNorm statistics frozen (eval), every parameter trains."""
    folded, plain = pair("tf_efficientnet_lite0", monkeypatch)
    images = torch.rand(2, 3, 64, 64)
    for encoder in (folded, plain):
        encoder.eval().requires_grad_(True)
        sum(f.square().mean() for f in encoder(images)).backward()
    names = [f"stages.0.3.0.{suffix}" for suffix in ("conv_pw.weight", "bn1.weight", "bn1.bias", "conv_dw.weight",
                                                     "bn2.weight")]
    names += ["stages.1.0.1.conv_dw.weight", "stages.1.0.1.bn2.bias"]  # 5x5 depthwise: the grouped weight gradient
    for name in names:
        grad, expected = folded.get_parameter(name).grad, plain.get_parameter(name).grad
        assert expected.abs().max() > 0
        torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    depthwise_5x5 = folded.get_submodule("stages.1.0.1.conv_dw")
    output = depthwise_5x5(torch.rand(1, depthwise_5x5.in_channels, 8, 8))
    assert type(output.grad_fn).__name__ == "_DepthwiseConv2dBackward"


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])  # timm's BatchNormAct2d, nn.BatchNorm2d
def test_training_mode_falls_back_to_batch_statistics(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    folded, plain = pair(name, monkeypatch)
    images = torch.rand(4, 3, 64, 64)
    before = folded.stages[0][1].running_mean.clone()
    with torch.no_grad():
        for a, b in zip(folded.train()(images), plain.train()(images)):
            torch.testing.assert_close(a, b)
    assert not torch.equal(folded.stages[0][1].running_mean, before)


def test_a_convolution_output_read_twice_is_not_folded() -> None:
    class ReadTwice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hidden = self.conv(x)
            return self.bn(hidden) + hidden

    torch.manual_seed(0)
    module = ReadTwice()
    module.bn.running_mean.uniform_(-1, 1)
    module.bn.running_var.uniform_(0.5, 2)
    module.eval()
    images = torch.rand(2, 3, 8, 8)
    expected = module(images)
    assert fold_batchnorms(module, images) == 0
    assert type(module.conv) is nn.Conv2d and type(module.bn) is nn.BatchNorm2d
    assert "batchnorm" not in module.conv.__dict__
    torch.testing.assert_close(module(images), expected)


def test_a_copy_folds_its_own_batchnorm_and_survives_pickling() -> None:
    """DMDD's student is a deep copy of the teacher's stages; DDP pickles the model into its workers."""
    teacher = create_encoder("resnet18", pretrained=False).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = teacher(images)
        student = copy.deepcopy(teacher)
        conv = student.stages[0][0]
        assert isinstance(conv, FoldedConv2d) and conv.__dict__["batchnorm"] is student.stages[0][1]
        student.stages[0][1].weight.mul_(2)
        assert not torch.allclose(student(images)[0], expected[0])
        torch.testing.assert_close(teacher(images)[0], expected[0])
        restored = pickle.loads(pickle.dumps(student))
        torch.testing.assert_close(restored(images)[0], student(images)[0])
