"""The plain Hugging Face loop a user would write instead of `platescope detect`: one image at a time,
open -> image processor -> model -> post-process, and the rows written to one Parquet file at the end.

`platescope bench detect --vs-naive` runs it in a fresh process on the same images and model, so the
two whole-process times compare like for like. Kept deliberately plain: no batching, no threads set,
nothing a first version would not have.

    python -m platescope.naive_loop --images DIR --model DIR --threshold 0.3 --output rows.parquet
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m platescope.naive_loop", description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="a text file with one image path per line")
    parser.add_argument("--model", required=True, help="model dir")
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--output", required=True, help="Parquet file of the rows")
    args = parser.parse_args(argv)

    started = time.monotonic()
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    processor = AutoImageProcessor.from_pretrained(args.model)
    model = AutoModelForObjectDetection.from_pretrained(args.model).eval()
    paths = [line for line in open(args.images).read().splitlines() if line]
    rows = []
    first_result_s = None
    for path in paths:
        image = Image.open(path).convert("RGB")
        inputs = processor(images=image, return_tensors="pt")
        with torch.no_grad():
            outputs = model(**inputs)
        (result,) = processor.post_process_object_detection(outputs, threshold=args.threshold,
                                                            target_sizes=[(image.height, image.width)])
        rows.append({"source_uri": path, "width": image.width, "height": image.height,
                     "boxes": result["boxes"].tolist(), "scores": result["scores"].tolist(),
                     "label_ids": result["labels"].tolist()})
        if first_result_s is None:
            first_result_s = time.monotonic() - started
    pq.write_table(pa.Table.from_pylist(rows), args.output)
    print(json.dumps({"images": len(rows), "first_result_s": round(first_result_s or 0.0, 3),
                      "seconds": round(time.monotonic() - started, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
