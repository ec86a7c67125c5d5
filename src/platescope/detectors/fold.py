"""Batch norms folded into the convolutions they follow, for inference.

A convolution followed by an eval-mode batch norm is one affine map per output channel: the norm's
scale multiplies the convolution's weights and its shift becomes the convolution's bias. Hugging Face
keeps them apart (the ResNet backbones of DETR and RT-DETR use a "frozen" batch norm that recomputes
its scale on every call and then makes two passes over the activations), which on CPU cost the
default model about a tenth of its time. The boxes and scores stay the same up to float rounding.

Which norm follows which convolution is read from Hugging Face's own layer pattern (a layer with a
`convolution` and a `normalization`, or a `conv` and a `norm`) and from neighbours in a Sequential,
and each fold is checked by running the layer on a random input before and after: a layer that does
anything else between the two keeps its norm.
"""

from __future__ import annotations

from typing import Any

# (convolution, norm) attribute names of one Hugging Face conv layer whose forward is conv -> norm -> ...
CONV_NORM_NAMES = (("convolution", "normalization"), ("conv", "norm"))
DEFAULT_EPS = 1e-5  # the frozen batch norms of transformers hard-code it
CHECK_TOLERANCE = 1e-4


def fold_conv_norms(model: Any) -> int:
    """Fold every batch norm that directly follows a convolution into it (model in eval mode, on any
    device); returns how many were folded."""
    import torch

    folded = 0
    with torch.no_grad():
        for owner, conv_name, norm_name, check in _conv_norm_pairs(model):
            conv, norm = getattr(owner, conv_name, None), getattr(owner, norm_name, None)
            stats = _batch_norm_stats(norm) if isinstance(conv, torch.nn.Conv2d) else None
            if stats is not None:
                folded += _fold_checked(check, owner, conv, norm, norm_name, stats)
    return folded


def _conv_norm_pairs(model: Any):
    """(owner, conv name, norm name, what to run to check the fold) for each place a norm may follow a
    convolution: a Hugging Face conv layer (run whole), and two neighbours in a Sequential (run the two)."""
    import torch

    for layer in list(model.modules()):
        for conv_name, norm_name in CONV_NORM_NAMES:
            yield layer, conv_name, norm_name, layer
        if isinstance(layer, torch.nn.Sequential):
            names = list(layer._modules)
            for first, second in zip(names, names[1:]):
                def pair(x, layer=layer, first=first, second=second):
                    return layer._modules[second](layer._modules[first](x))

                yield layer, first, second, pair


def _batch_norm_stats(norm: Any) -> tuple[Any, Any, Any, Any, float] | None:
    """(weight, bias, running mean, running var, eps) of an inference-time batch norm, else None."""
    import torch

    if not isinstance(norm, torch.nn.Module) or norm.training:
        return None
    names = ("weight", "bias", "running_mean", "running_var")
    values = [getattr(norm, name, None) for name in names]
    if any(not isinstance(v, torch.Tensor) or v.dim() != 1 for v in values):
        return None
    if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm) and not norm.track_running_stats:
        return None
    return (*values, float(getattr(norm, "eps", DEFAULT_EPS)))


def _fold_checked(check: Any, owner: Any, conv: Any, norm: Any, norm_name: str, stats: tuple) -> int:
    """Fold `norm` (its `_batch_norm_stats`) into `conv` and put an identity in its place in `owner`,
    if `check` gives the same output on a random input afterwards; else leave it as it was. 1 if folded."""
    import torch

    weight, bias, mean, var, eps = stats
    if weight.numel() != conv.out_channels:
        return 0
    side = max(8, *(k + (k - 1) * (d - 1) for k, d in zip(conv.kernel_size, conv.dilation)))
    probe = torch.randn(1, conv.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    probe = probe.to(conv.weight.device, conv.weight.dtype)
    try:
        before = check(probe)
    except Exception:  # noqa: BLE001 - a layer that takes other inputs is not one we can check
        return 0
    if not isinstance(before, torch.Tensor):
        return 0
    old_weight, old_bias = conv.weight, conv.bias
    scale = weight * torch.rsqrt(var + eps)
    shift = bias - mean * scale
    conv.weight = torch.nn.Parameter(old_weight * scale.reshape(-1, 1, 1, 1), requires_grad=False)
    conv.bias = torch.nn.Parameter(shift if old_bias is None else old_bias * scale + shift, requires_grad=False)
    setattr(owner, norm_name, torch.nn.Identity())
    after = check(probe)
    if after.shape == before.shape and torch.allclose(after, before, rtol=CHECK_TOLERANCE, atol=CHECK_TOLERANCE):
        return 1
    conv.weight, conv.bias = old_weight, old_bias
    setattr(owner, norm_name, norm)
    return 0
