"""Randomly initialised detectors built from named architecture presets, saved as model dirs.

Nothing here downloads weights: tests, the demo and benchmarks need model dirs that load through
exactly the same path as a fine-tuned or hub checkpoint (`AutoModelForObjectDetection` +
`AutoImageProcessor` on a folder of safetensors + config.json + preprocessor_config.json), on
machines without internet. Random weights still give boxes and scores, which is all those callers
need; the real-size presets reproduce the published architectures so timings mean something.
Fresh transformers inits are nearly input-independent at tiny widths (every query predicts about
the same box), so the `*-tiny-test` presets use a wider init: tests comparing two code paths then
fail when the paths disagree.

Sources for the real-size presets are the configs the upstream conversion scripts wrote:
RT-DETR r18vd (ResNet-18-vd backbone, basic blocks, hidden expansion 0.5, 3 decoder layers,
640x640 input) and YOLOS tiny/small (DeiT-Ti/-S bodies; tiny evaluates at shortest edge 512 with
position embeddings sized for 800x1333 and no mid-layer position embeddings, small at 800 with
512x864 position embeddings that are interpolated at run time).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

DEFAULT_ID2LABEL: dict[int, str] = {0: "licence_plate"}


def _processor(name: str, **kwargs: Any) -> Any:
    """The image processor class `name` in whichever backend this machine has.

    Both backends save the same `image_processor_type`, so `AutoImageProcessor` picks the best
    backend on the machine that loads the dir; choosing here only avoids transformers' warning
    about falling back to PIL where torchvision is missing.
    """
    import transformers
    from transformers.utils import is_torchvision_available

    return getattr(transformers, name if is_torchvision_available() else f"{name}Pil")(**kwargs)


def _yolos(*, hidden: int, layers: int, heads: int, image_size: list[int], mid_pe: bool,
           det_tokens: int, processor_size: dict[str, int], init: float = 0.02) -> tuple[Any, Any]:
    from transformers import YolosConfig

    config = YolosConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        image_size=image_size,
        use_mid_position_embeddings=mid_pe,
        num_detection_tokens=det_tokens,
        initializer_range=init,
    )
    return config, _processor("YolosImageProcessor", size=processor_size)


def _yolos_tiny_test() -> tuple[Any, Any]:
    # Two layers of width 32 at shortest edge 128: milliseconds per small batch on CPU. The tiny
    # presets use a wide init (module docstring) so boxes and scores visibly depend on the image.
    return _yolos(hidden=32, layers=2, heads=2, image_size=[128, 224], mid_pe=False, det_tokens=10,
                  processor_size={"shortest_edge": 128, "longest_edge": 224}, init=0.2)


def _yolos_tiny() -> tuple[Any, Any]:
    return _yolos(hidden=192, layers=12, heads=3, image_size=[800, 1333], mid_pe=False, det_tokens=100,
                  processor_size={"shortest_edge": 512, "longest_edge": 1333})


def _yolos_small() -> tuple[Any, Any]:
    return _yolos(hidden=384, layers=12, heads=6, image_size=[512, 864], mid_pe=True, det_tokens=100,
                  processor_size={"shortest_edge": 800, "longest_edge": 1333})


def _detr_tiny_test() -> tuple[Any, Any]:
    from transformers import DetrConfig, ResNetConfig

    # A transformers-native ResNet backbone config: DETR otherwise defaults to a timm backbone,
    # which would need timm installed (and, for the stock one, pretrained weights).
    backbone = ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
        out_features=["stage4"],
    )
    config = DetrConfig(
        backbone_config=backbone,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=10,
        init_std=0.15,
    )
    return config, _processor("DetrImageProcessor", size={"shortest_edge": 128, "longest_edge": 224})


def _rtdetr(*, backbone: dict[str, Any], encoder_in_channels: list[int], **kwargs: Any) -> tuple[Any, Any]:
    from transformers import RTDetrConfig, RTDetrResNetConfig

    size = kwargs.pop("image_size", 640)
    config = RTDetrConfig(
        backbone_config=RTDetrResNetConfig(layer_type="basic", out_indices=[2, 3, 4], **backbone),
        encoder_in_channels=encoder_in_channels,
        hidden_expansion=0.5,
        **kwargs,
    )
    return config, _processor("RTDetrImageProcessor", size={"height": size, "width": size})


def _rtdetr_tiny_test() -> tuple[Any, Any]:
    return _rtdetr(
        backbone={"embedding_size": 16, "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1]},
        encoder_in_channels=[32, 64, 128],
        encoder_hidden_dim=32,
        d_model=32,
        decoder_in_channels=[32, 32, 32],
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        decoder_layers=1,
        num_queries=10,
        initializer_range=0.15,
        image_size=160,
    )


def _rtdetr_r18() -> tuple[Any, Any]:
    return _rtdetr(
        backbone={"embedding_size": 64, "hidden_sizes": [64, 128, 256, 512], "depths": [2, 2, 2, 2]},
        encoder_in_channels=[128, 256, 512],
        decoder_layers=3,
        image_size=640,
    )


def _rtdetr_slim() -> tuple[Any, Any]:
    # RT-DETR r18's layout at half the backbone width and a 128-wide transformer, at 384 px: about
    # 5M parameters (10 MB in fp16), light enough to train from scratch and ship in the repository.
    return _rtdetr(
        backbone={"embedding_size": 32, "hidden_sizes": [32, 64, 128, 256], "depths": [2, 2, 2, 2]},
        encoder_in_channels=[64, 128, 256],
        encoder_hidden_dim=128,
        d_model=128,
        decoder_in_channels=[128, 128, 128],
        encoder_ffn_dim=512,
        decoder_ffn_dim=512,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        decoder_layers=3,
        num_queries=100,
        image_size=384,
    )


_BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "yolos-tiny-test": _yolos_tiny_test,
    "detr-tiny-test": _detr_tiny_test,
    "rtdetr-tiny-test": _rtdetr_tiny_test,
    "rtdetr-r18": _rtdetr_r18,
    "rtdetr-slim": _rtdetr_slim,
    "yolos-tiny": _yolos_tiny,
    "yolos-small": _yolos_small,
}

PRESET_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def _init_like_upstream(model: Any, std: float) -> None:
    """Give YOLOS's tokens and position embeddings the truncated-normal init of the original
    YOLOS/DeiT code. transformers leaves them at zero (checkpoints overwrite them), which makes all
    detection tokens identical, so a fresh model would predict one box a hundred times."""
    import torch

    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] in ("cls_token", "detection_tokens", "position_embeddings",
                                       "mid_position_embeddings"):
            torch.nn.init.trunc_normal_(param, std=std)


def build_model(preset: str, *, id2label: dict[int, str] | None = None, seed: int = 0) -> tuple[Any, Any]:
    """A randomly initialised `preset` model (in eval mode) and its image processor, in memory.

    The same preset, labels and seed always give the same weights, so content hashes of the
    weights (the detector's model_id) are reproducible from run to run (for one torch version).
    """
    if preset not in _BUILDERS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    import torch
    from transformers import AutoModelForObjectDetection

    labels = {int(k): str(v) for k, v in (id2label or DEFAULT_ID2LABEL).items()}
    config, processor = _BUILDERS[preset]()
    config.id2label = labels
    config.label2id = {v: k for k, v in labels.items()}

    # fork_rng so building a model does not reset the caller's global torch RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForObjectDetection.from_config(config)
        with torch.no_grad():
            _init_like_upstream(model, std=0.02)
    model.eval()
    return model, processor


def build_model_dir(
    preset: str, dest: str, *, id2label: dict[int, str] | None = None, seed: int = 0
) -> str:
    """Write a randomly initialised `preset` model dir (see build_model) to `dest` and return `dest`."""
    model, processor = build_model(preset, id2label=id2label, seed=seed)
    os.makedirs(dest, exist_ok=True)
    # transformers 5 always writes safetensors (model.safetensors); there is no pickle option left.
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest
