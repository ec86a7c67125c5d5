"""Batch norms folded into the convolutions they follow: every one in the DETR and RT-DETR families,
outputs equal up to float rounding, and only where the norm really takes the convolution's output."""

from __future__ import annotations

import pytest
import torch

from platescope.detectors.fold import fold_conv_norms


def _is_norm(module: torch.nn.Module) -> bool:
    return "BatchNorm" in type(module).__name__


@pytest.mark.parametrize("preset", ["detr-tiny-test", "rtdetr-tiny-test"])
def test_every_norm_after_a_convolution_is_folded_and_the_outputs_stay(preset, tmp_path):
    from transformers import AutoModelForObjectDetection

    from platescope.detectors.presets import build_model_dir

    path = build_model_dir(preset, str(tmp_path / preset))
    plain = AutoModelForObjectDetection.from_pretrained(path).eval()
    folded = AutoModelForObjectDetection.from_pretrained(path).eval()
    norms = sum(_is_norm(m) for m in folded.modules())
    assert norms > 0
    assert fold_conv_norms(folded) == norms
    assert not any(_is_norm(m) for m in folded.modules())

    pixels = torch.rand(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = plain(pixel_values=pixels), folded(pixel_values=pixels)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.pred_boxes, a.pred_boxes, atol=1e-5, rtol=1e-4)


class _NormAfterActivation(torch.nn.Module):
    """A layer named like Hugging Face's conv layers, but with a ReLU between conv and norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.relu(self.conv(x)))


def _with_stats(layer: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(layer.norm, name).copy_(torch.randn(4, generator=generator))
        layer.norm.running_var.copy_(torch.rand(4, generator=generator) + 0.5)
    return layer.eval()


def test_a_norm_that_does_not_take_the_convolution_s_output_stays():
    layer = _with_stats(_NormAfterActivation())
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    before = layer(x)
    assert fold_conv_norms(layer) == 0
    assert isinstance(layer.norm, torch.nn.BatchNorm2d) and layer.conv.bias is None
    torch.testing.assert_close(layer(x), before)


def test_neighbours_in_a_sequential_are_folded_and_a_training_norm_is_not():
    sequential = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, bias=True), torch.nn.BatchNorm2d(4))
    with torch.no_grad():
        sequential[1].running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        sequential[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 3.0]))
    assert fold_conv_norms(sequential.train()) == 0
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(4))
    before = sequential.eval()(x)
    assert fold_conv_norms(sequential) == 1
    assert isinstance(sequential[1], torch.nn.Identity)
    torch.testing.assert_close(sequential(x), before, atol=1e-5, rtol=1e-5)
