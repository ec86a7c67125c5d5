"""`platescope demo`: the detect job on an embedded default, offline, on a local Ray.

It generates sample inputs (synthetic plate scenes, a short video and a few deliberately bad files)
and runs `detect` over them with the licence-plate model that ships in the package
(platescope.models), so it needs no network and no model download.
"""

from __future__ import annotations

import argparse
import os

DEFAULT_WORKDIR = "platescope-demo"


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


def describe_model(model_dir: str) -> str:
    """One line on the bundled model: what it is and how it scored on its val set."""
    import json

    try:
        with open(os.path.join(model_dir, "platescope_training.json")) as f:
            metrics = json.load(f)["val_metrics"]
    except (OSError, KeyError, ValueError):
        return model_dir
    return f"{model_dir} (val AP50 {metrics['map_50']:.3f}, AP {metrics['map']:.3f})"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run detect on generated sample inputs with the default model",
                       description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="where inputs and output go")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="detect config overrides")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from platescope.cli import run_detect_command
    from platescope.config import DetectConfig, build_config
    from platescope.models import default_model_dir
    from platescope.pipeline.summary import format_summary

    inputs = prepare_inputs(args.workdir)
    model = default_model_dir()
    print(f"platescope demo: model {describe_model(model)}")

    def config() -> DetectConfig:
        return build_config(
            DetectConfig,
            values={"input": [inputs], "output": os.path.join(args.workdir, "output"), "model": model,
                    "threshold": 0.5, "video_fps": 2.0,
                    # The sample inputs hold one bad file of each kind on purpose.
                    "max_error_fraction": 1.0},
            overrides=args.overrides,
        )

    code, result = run_detect_command("platescope demo", config)
    if code is not None:
        return code
    print(format_summary(result.summary))
    return 0
