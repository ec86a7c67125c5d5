"""Write a synthetic plate set (JPEG scenes + COCO JSON) to pretrain a detector on before real data.

    python scripts/make_pretraining_set.py /tmp/synthetic --images 2000
    platescope train preset=rtdetr-slim train=/tmp/synthetic/annotations.json storage=... name=synthetic ...
    platescope train model=<storage>/synthetic/model train=<real train.json> val=<real val.json> ...

The scenes are `platescope.samples` scenes (gradient and clutter backgrounds, drawn plates with random
characters), spread wider than the test scenes so that the detector sees what other cameras give: the
frame sizes of a 4:3 photo, a 16:9 road frame and a VGA camera, plates from 4 % to 50 % of the frame's
width, and shapes from square-ish two-row plates to long single-row ones (width over height 1.2 to 5,
the range of ../shared/data/plates). Every box is exact, as the plates are drawn, so boxes can be
learnt tight. Same bytes per seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from platescope import samples

FRAME_SIZES = [(400, 300), (1280, 720), (640, 480)]
PLATE_WIDTH = (0.04, 0.5)
PLATE_ASPECT = (1.2, 5.0)
MIN_PLATE = (16, 7)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder for the images and annotations.json")
    parser.add_argument("--images", type=int, default=2000, help="number of scenes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images {args.images}: at least 1")
    path = samples.write_image_dataset(Path(args.out), args.images, seed=args.seed, sizes=FRAME_SIZES,
                                       plate_width=PLATE_WIDTH, plate_aspect=PLATE_ASPECT, min_plate=MIN_PLATE)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
