"""Split a COCO plate set by camera source, for cross-domain checks (train on one source, test on another).

    python scripts/split_by_source.py ../shared/data/plates /tmp/xdomain

reads <plates>/train.json and val.json (each image has a "source", e.g. kaggle or dashcam) and writes,
for every source S, into the output folder:

    S-train.json   the training images of S        (train on it)
    S-val.json     the val images of S             (choose checkpoints on it)
    S-all.json     train + val images of S         (test a model trained on another source on it)
    S-images/      links to exactly the images of S-all.json, for `detect --input`

with an `images` link to the original image folder, so the JSONs' file names resolve unchanged.
Nothing is copied.
"""

from __future__ import annotations

import argparse
import json
import os


def _subset(coco: dict, keep: set[int]) -> dict:
    return {**coco, "images": [im for im in coco["images"] if im["id"] in keep],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in keep]}


def split(plates: str, out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    link = os.path.join(out, "images")
    if not os.path.lexists(link):
        os.symlink(os.path.abspath(os.path.join(plates, "images")), link)
    sets = {name: json.load(open(os.path.join(plates, f"{name}.json"))) for name in ("train", "val")}
    sources = sorted({im.get("source", "unknown") for coco in sets.values() for im in coco["images"]})
    written = []
    for source in sources:
        ids = {name: {im["id"] for im in coco["images"] if im.get("source", "unknown") == source}
               for name, coco in sets.items()}
        for name, coco in sets.items():
            written.append(_write(out, f"{source}-{name}.json", _subset(coco, ids[name])))
        # Image ids are unique across train and val in this set; refuse to merge if they were not.
        if ids["train"] & ids["val"]:
            raise SystemExit(f"{plates}: train and val share image ids; cannot merge them into {source}-all.json")
        merged = _subset(sets["train"], ids["train"])
        merged["images"] += _subset(sets["val"], ids["val"])["images"]
        merged["annotations"] += _subset(sets["val"], ids["val"])["annotations"]
        written.append(_write(out, f"{source}-all.json", merged))
        folder = os.path.join(out, f"{source}-images", "images")
        os.makedirs(folder, exist_ok=True)
        for im in merged["images"]:
            dest = os.path.join(out, f"{source}-images", im["file_name"])
            if not os.path.lexists(dest):
                os.symlink(os.path.abspath(os.path.join(plates, im["file_name"])), dest)
    return written


def _write(out: str, name: str, coco: dict) -> str:
    path = os.path.join(out, name)
    with open(path, "w") as f:
        json.dump(coco, f)
    return f"{path}: {len(coco['images'])} images, {len(coco['annotations'])} boxes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plates", help="folder with train.json, val.json and images/")
    parser.add_argument("out", help="folder to write the per-source sets into")
    args = parser.parse_args()
    for line in split(args.plates, args.out):
        print(line)


if __name__ == "__main__":
    main()
