"""`platescope demo`: the detect job on an embedded default, offline, on a local Ray.

It generates sample inputs (synthetic plate scenes, a short video and a few deliberately bad files)
and runs `detect` over them with the default model. platescope does not ship trained weights yet, so
the default model is a randomly initialised YOLOS-tiny-sized detector built from its config: the
pipeline, table and summary are real, the boxes are not meaningful.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_WORKDIR = "platescope-demo"
DEFAULT_MODEL_PRESET = "yolos-tiny-test"


def prepare_inputs(folder: str, *, num_images: int = 24, seed: int = 0) -> str:
    """Sample inputs in `folder/inputs` (made once); returns that folder."""
    from platescope import samples

    inputs = os.path.join(folder, "inputs")
    if os.path.isdir(inputs) and os.listdir(inputs):
        return inputs
    samples.write_image_dataset(os.path.join(inputs, "scenes"), num_images, seed=seed)
    samples.write_video(os.path.join(inputs, "videos", "street.mp4"), num_frames=40, fps=10, seed=seed)
    bad = os.path.join(inputs, "bad")
    samples.write_bad_inputs(bad)
    return inputs


def default_model(folder: str) -> str:
    """The default model dir, built from its config once (random weights; see module doc)."""
    from platescope.detectors.presets import build_model_dir

    path = os.path.join(folder, "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        build_model_dir(DEFAULT_MODEL_PRESET, path)
    return path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run detect on generated sample inputs with the default model",
                       description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="where inputs, model and output go")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="detect config overrides")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from platescope.cli import EXIT_CANNOT_START
    from platescope.config import ConfigError, DetectConfig, build_config
    from platescope.pipeline.run import PreflightError, run_detect
    from platescope.pipeline.summary import format_summary

    inputs = prepare_inputs(args.workdir)
    model = default_model(args.workdir)
    print(f"platescope demo: model {model} ({DEFAULT_MODEL_PRESET}, random weights: boxes are not meaningful)")
    try:
        cfg = build_config(
            DetectConfig,
            values={"input": [inputs], "output": os.path.join(args.workdir, "output"), "model": model,
                    "threshold": 0.5, "video_fps": 2.0,
                    # The sample inputs hold one bad file of each kind on purpose.
                    "max_error_fraction": 1.0},
            overrides=args.overrides,
        )
        result = run_detect(cfg)
    except (ConfigError, PreflightError) as e:
        print(f"platescope demo: error: {e}", file=sys.stderr)
        return EXIT_CANNOT_START
    print(format_summary(result.summary))
    return 0
