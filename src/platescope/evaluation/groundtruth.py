"""Ground-truth labels for `platescope evaluate`: COCO JSON, YOLO txt or Pascal VOC xml, local or s3://.

All three become one `GroundTruth` in COCO's box convention (x, y, width, height in pixels), so the
metrics see one thing. Labels are small next to the images and read once per evaluation, so they are
held in memory. Only YOLO touches images (its boxes are fractions of the image size), and then only
their headers. Every problem is a `GroundTruthError` naming the file: a wrong label should stop an
evaluation, never quietly shift its numbers.
"""

from __future__ import annotations

import json
import math
import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, TypeVar

import numpy as np
import yaml
from PIL import Image

from platescope import storage
from platescope.storage import S3Options

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
YOLO_NAMES_FILES = ("classes.txt", "obj.names", "data.yaml", "dataset.yaml")
FORMATS = ("coco", "yolo", "voc")
_IO_THREADS = 16  # label files and image headers are tiny reads: on S3 latency, not bandwidth, rules
_T, _R = TypeVar("_T"), TypeVar("_R")


class GroundTruthError(ValueError):
    """Unreadable or inconsistent labels; the message is one line naming the file and the problem."""


@dataclass
class GroundTruthImage:
    image_id: int  # COCO: the file's image id; YOLO/VOC: 1..N in order of key
    key: str  # posix path of the image relative to the labels' root
    width: int
    height: int
    boxes_xywh: np.ndarray  # (n, 4) float64, pixels, COCO's bbox convention
    category_ids: np.ndarray  # (n,) int64, keys of GroundTruth.categories
    areas: np.ndarray  # (n,) float64: COCO 'area' when present, else box width * height
    iscrowd: np.ndarray  # (n,) bool: COCO iscrowd, or VOC difficult (both ignored by matching)


@dataclass
class GroundTruth:
    uri: str
    format: str  # "coco" | "yolo" | "voc"
    categories: dict[int, str]  # COCO: ids as in the file; YOLO: class index + 1; VOC: 1..K by name
    images: list[GroundTruthImage]  # sorted by image_id

    @property
    def num_boxes(self) -> int:
        return sum(len(image.boxes_xywh) for image in self.images)


_Labels = tuple[dict[int, str], list[GroundTruthImage]]  # what each format's reader returns


def read_ground_truth(uri: str, *, format: str = "auto", s3: S3Options | None = None) -> GroundTruth:
    """Labels at `uri`: a COCO .json file, a folder of YOLO .txt labels, or VOC .xml (file or folder).

    Any failure is a GroundTruthError of one line naming `uri`: what the readers find wrong in the
    labels says so itself; storage failures (credentials, an unreachable endpoint, permissions) say
    which exception it was.
    """
    try:
        return _read(uri, format, s3)
    except GroundTruthError:
        raise
    except Exception as e:  # fsspec, botocore and the OS raise many kinds
        raise GroundTruthError(f"ground truth {uri}: cannot be read ({type(e).__name__}: "
                               f"{' '.join(str(e).split())})") from e


def _read(uri: str, format: str, s3: S3Options | None) -> GroundTruth:
    if format != "auto" and format not in FORMATS:
        raise GroundTruthError(f"ground truth {uri}: unknown format {format!r} (auto, coco, yolo or voc)")
    try:
        objects = [o.uri for o in storage.list_objects(uri, s3)]
    except FileNotFoundError:
        raise GroundTruthError(f"ground truth {uri}: not found") from None
    root = storage.to_uri(*storage.filesystem(uri, s3)).rstrip("/")
    is_file = objects == [root]
    extensions = {posixpath.splitext(o)[1].lower() for o in objects}
    fits = {
        "coco": is_file,
        "voc": (is_file and root.lower().endswith(".xml")) or (not is_file and ".xml" in extensions),
        "yolo": not is_file and ".txt" in extensions,
    }
    if format == "auto":
        fits["coco"] = is_file and root.lower().endswith(".json")
        format = next((name for name in ("coco", "voc", "yolo") if fits[name]), "")
        if not format:
            raise GroundTruthError(f"ground truth {uri}: neither a COCO .json file nor a folder of "
                                   "VOC .xml or YOLO .txt labels")
    elif not fits[format]:
        wanted = {"coco": "a .json file", "voc": "an .xml file or a folder of them",
                  "yolo": "a folder of .txt labels"}[format]
        raise GroundTruthError(f"ground truth {uri}: not {format} labels (expected {wanted})")
    if format == "coco":
        categories, images = _read_coco(root, s3)
    elif format == "voc":
        categories, images = _read_voc(root, objects, is_file, s3)
    else:
        categories, images = _read_yolo(root, objects, s3)
    return GroundTruth(uri=uri, format=format, categories=categories, images=images)


# -- COCO ------------------------------------------------------------------------------------------


def _read_coco(uri: str, s3: S3Options | None) -> _Labels:
    try:
        data = json.loads(storage.read_bytes(uri, s3))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are
        raise _error(uri, f"not JSON ({exc})") from None
    for field in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(field), list):
            raise _error(uri, f"no '{field}' list (COCO has images, annotations and categories)")
    categories: dict[int, str] = {}
    for entry in data["categories"]:
        try:
            category_id, name = _int(entry["id"]), entry["name"]
            if not isinstance(name, str):
                raise TypeError(name)
        except (KeyError, TypeError, ValueError):
            raise _error(uri, f"category {entry!r:.80} needs an integer 'id' and a string 'name'") from None
        if category_id in categories or name in categories.values():
            raise _error(uri, f"duplicate category id {category_id} or name {name!r}")
        categories[category_id] = name
    sizes: dict[int, tuple[str, int, int]] = {}
    for entry in data["images"]:
        try:
            image_id, size = _int(entry["id"]), (_key(entry["file_name"]), _int(entry["width"]),
                                                 _int(entry["height"]))
        except (KeyError, TypeError, ValueError):
            raise _error(uri, f"image {entry!r:.80} needs integer id, width, height and a file_name") from None
        if image_id in sizes:
            raise _error(uri, f"duplicate image id {image_id}")
        sizes[image_id] = size
    _check_unique_keys(uri, [(key, f"image {i}") for i, (key, _, _) in sizes.items()])
    rows: dict[int, list[tuple[list[float], int, float, bool]]] = {image_id: [] for image_id in sizes}
    for ann in data["annotations"]:
        ann = ann if isinstance(ann, dict) else {}
        where = f"annotation {ann.get('id')!r}"
        image_id, category_id, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
        if not _is_number(image_id) or image_id not in rows:
            raise _error(uri, f"{where}: unknown image_id {image_id!r}")
        if not _is_number(category_id) or category_id not in categories:
            raise _error(uri, f"{where}: unknown category_id {category_id!r}")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
            raise _error(uri, f"{where}: bbox {bbox!r:.80} is not 4 numbers")
        if bbox[2] < 0 or bbox[3] < 0:
            raise _error(uri, f"{where}: bbox {bbox!r} has a negative width or height")
        area = ann.get("area", bbox[2] * bbox[3])
        if not _is_number(area):
            raise _error(uri, f"{where}: area {area!r:.80} is not a number")
        rows[image_id].append((bbox, int(category_id), float(area), bool(ann.get("iscrowd", 0))))
    images = [_image(image_id, key, width, height, rows[image_id])
              for image_id, (key, width, height) in sorted(sizes.items())]
    return categories, images


# -- Pascal VOC ------------------------------------------------------------------------------------


def _read_voc(root: str, objects: list[str], is_file: bool, s3: S3Options | None) -> _Labels:
    files = [root] if is_file else [o for o in objects if o.lower().endswith(".xml")]
    parsed = _parallel(lambda uri: _parse_voc(uri, storage.read_bytes(uri, s3)), files)
    names = sorted({name for *_, boxes in parsed for name, _, _ in boxes})
    category_ids = {name: index for index, name in enumerate(names, 1)}
    entries = []
    for xml_uri, (filename, width, height, boxes) in zip(files, parsed):
        folder = "" if is_file else posixpath.dirname(xml_uri[len(root) + 1:])
        # <path> and <folder> are ignored: they record the annotator's machine, not this dataset.
        entries.append((_key(posixpath.join(folder, filename)), xml_uri, width, height,
                        [(box, category_ids[name], box[2] * box[3], difficult) for name, box, difficult in boxes]))
    entries.sort(key=lambda e: e[0])
    _check_unique_keys(root, [(key, xml_uri) for key, xml_uri, *_ in entries])
    images = [_image(image_id, key, width, height, rows)
              for image_id, (key, _, width, height, rows) in enumerate(entries, 1)]
    return dict(enumerate(names, 1)), images


def _parse_voc(uri: str, data: bytes) -> tuple[str, int, int, list[tuple[str, list[float], bool]]]:
    probe = data.decode("utf-16", "replace").encode() if data[:2] in (b"\xff\xfe", b"\xfe\xff") else data
    if b"<!DOCTYPE" in probe or b"<!ENTITY" in probe:
        # Entity declarations are how XML expands a few bytes into gigabytes; labels never need them.
        raise _error(uri, "DOCTYPE/ENTITY declarations are not accepted in VOC labels")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise _error(uri, f"not XML ({exc})") from None
    filename = (root.findtext("filename") or "").strip()
    if root.tag != "annotation" or not filename:
        raise _error(uri, "not a VOC annotation (needs <annotation> with a <filename>)")
    try:
        width, height = (_int(float(root.findtext(f"size/{side}") or "")) for side in ("width", "height"))
    except (ValueError, TypeError):
        width = height = 0
    if width <= 0 or height <= 0:
        raise _error(uri, "no <size> with positive integer <width> and <height>")
    boxes = []
    for index, obj in enumerate(root.findall("object"), 1):
        name = (obj.findtext("name") or "").strip()
        try:
            xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{c}") or "")
                                      for c in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            xmin = ymin = xmax = ymax = math.nan
        if not math.isfinite(xmin + ymin + xmax + ymax):
            raise _error(uri, f"object {index} ({name}): <bndbox> needs numeric xmin, ymin, xmax, ymax")
        if not name or xmax < xmin or ymax < ymin:
            raise _error(uri, f"object {index} ({name or 'no <name>'}): box {xmin},{ymin},{xmax},{ymax} "
                              "needs a name and xmax >= xmin, ymax >= ymin")
        difficult = (obj.findtext("difficult") or "0").strip().lower() in ("1", "true")
        # Taken as written (no -1 shift for VOC's historical 1-based pixel indices): the tools that
        # write VOC today disagree on that, and the same boxes must read alike in all three formats.
        boxes.append((name, [xmin, ymin, xmax - xmin, ymax - ymin], difficult))
    return filename, width, height, boxes


# -- YOLO ------------------------------------------------------------------------------------------


def _read_yolo(root: str, objects: list[str], s3: S3Options | None) -> _Labels:
    names, names_uri = _yolo_names(root, objects, s3)
    texts = _parallel(lambda uri: (uri, _text(uri, storage.read_bytes(uri, s3))),
                      [o for o in objects if o.lower().endswith(".txt") and o != names_uri
                       and posixpath.basename(o) != "classes.txt"])
    listings: dict[str, dict[tuple[str, str], list[str]]] = {}

    def images_in(prefix: str) -> dict[tuple[str, str], list[str]]:  # (folder, stem) -> images
        if prefix not in listings:
            if prefix == root or prefix.startswith(root + "/"):
                found = [o for o in objects if o == prefix or o.startswith(prefix + "/")]
            else:
                try:
                    found = [o.uri for o in storage.list_objects(prefix, s3)]
                except FileNotFoundError:
                    found = []
            listings[prefix] = index = {}
            for o in found:
                stem, ext = posixpath.splitext(o)
                if ext.lower() in IMAGE_EXTENSIONS:
                    index.setdefault((posixpath.dirname(o), posixpath.basename(stem)), []).append(o)
        return listings[prefix]

    image_roots: set[str] = set()
    labelled: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}
    for label, text in texts:
        if text.lstrip().split("\n", 1)[0].rstrip().lower().endswith(IMAGE_EXTENSIONS):
            continue  # an image list (train.txt in Darknet and Ultralytics layouts), not labels
        classes, boxes = _parse_yolo_label(label, text, names)
        folder, stem = posixpath.split(posixpath.splitext(label)[0])
        mapped = _labels_to_images(root, folder)
        found, images_root = [], root
        if mapped:
            images_root, image_folder, scan = mapped
            found = images_in(scan).get((image_folder, stem), [])
        if not found:
            images_root, found = root, images_in(root).get((folder, stem), [])
        if len(found) != 1:
            problem = "no image" if not found else f"{len(found)} images ({', '.join(found)})"
            raise _error(label, f"label file has {problem} with stem {stem!r} in images/ or beside it")
        if found[0] in labelled:
            raise _error(label, f"{found[0]} already has labels in {labelled[found[0]][0]}")
        image_roots.add(images_root)
        labelled[found[0]] = (label, classes, boxes)
    if not labelled:
        raise _error(root, "no YOLO label files matched to images")
    # Images without a label file are negatives (YOLO's convention); keys are relative to the
    # innermost images root holding them.
    keys: dict[str, str] = {}
    for images_root in image_roots:
        for found in images_in(_scan_prefix(root, images_root)).values():
            for image in found:
                owner = max((r for r in image_roots if image.startswith(r + "/")), key=len)
                keys[image] = image[len(owner) + 1:]
    _check_unique_keys(root, [(key, image) for image, key in keys.items()])
    ordered = sorted(keys, key=keys.get)
    sizes = _parallel(lambda image: _image_size(image, s3), ordered)
    images = []
    for image_id, (image, (width, height)) in enumerate(zip(ordered, sizes), 1):
        _, classes, norm = labelled.get(image, ("", np.zeros(0, np.int64), np.zeros((0, 4))))
        xywh = np.stack([(norm[:, 0] - norm[:, 2] / 2) * width, (norm[:, 1] - norm[:, 3] / 2) * height,
                         norm[:, 2] * width, norm[:, 3] * height], axis=1)
        rows = [(box, c, box[2] * box[3], False) for box, c in zip(xywh.tolist(), classes.tolist())]
        images.append(_image(image_id, keys[image], width, height, rows))
    return {index + 1: name for index, name in sorted(names.items())}, images


def _yolo_names(root: str, objects: list[str], s3: S3Options | None) -> tuple[dict[int, str], str]:
    # The folder, its parent, and the dataset folder holding labels/ when that is higher up (a
    # split's labels, labels/val, are the usual thing to evaluate; data.yaml sits two levels up).
    mapped = _labels_to_images(root, root)
    folders = [root, _parent(root), _parent(mapped[0]) if mapped else None]
    folders = [f for i, f in enumerate(folders) if f and f not in folders[:i]]
    for folder in folders:
        for name in YOLO_NAMES_FILES:
            uri = f"{folder}/{name}"
            if folder == root and uri not in objects:
                continue
            try:
                data = storage.read_bytes(uri, s3)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                continue
            text = _text(uri, data)
            if name.endswith(".yaml"):
                try:
                    doc = yaml.safe_load(text)
                    names = doc["names"]
                    names = dict(enumerate(names)) if isinstance(names, list) else dict(names)
                    names = {int(k): str(v) for k, v in names.items()}
                except (yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
                    raise _error(uri, f"no 'names' list or {{index: name}} mapping ({exc})") from None
            else:
                names = dict(enumerate(line.strip() for line in text.splitlines() if line.strip()))
            if not names:
                raise _error(uri, "no class names in it")
            return names, uri
    raise _error(root, f"no class names: looked for {', '.join(YOLO_NAMES_FILES)} in "
                       + ", ".join(folders))


def _parse_yolo_label(uri: str, text: str, names: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
    classes, boxes = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            values = [float(v) for v in line.split()]
        except ValueError:
            values = []
        if len(values) != 5 or not all(map(math.isfinite, values)):
            raise _error(f"{uri} line {number}", f"expected 'class cx cy w h', got {line.strip()!r:.80}")
        if not values[0].is_integer() or int(values[0]) not in names:
            raise _error(f"{uri} line {number}", f"class {line.split()[0]} is not one of the "
                                                 f"{len(names)} class names")
        if not all(-1e-6 <= v <= 1 + 1e-6 for v in values[1:]):
            raise _error(f"{uri} line {number}", "coordinates are not normalised to 0..1")
        classes.append(int(values[0]) + 1)
        boxes.append(values[1:])
    return np.array(classes, np.int64), np.array(boxes, np.float64).reshape(-1, 4)


def _labels_to_images(root: str, folder: str) -> tuple[str, str, str] | None:
    """(images root, image folder, folder to look for negatives in) for labels in `folder`, whose
    last path component named `labels` becomes `images`; None when there is no such component."""
    scheme, path = ("s3://", folder[5:]) if storage.is_s3(folder) else ("", folder)
    parts = path.split("/")
    for i in range(len(parts) - 1, 0 if scheme else -1, -1):  # a bucket named "labels" is no folder
        if parts[i] == "labels":
            mapped = parts[:i] + ["images"] + parts[i + 1:]
            images_root = scheme + "/".join(mapped[: i + 1])
            return images_root, scheme + "/".join(mapped), _scan_prefix(root, images_root)
    return None


def _scan_prefix(root: str, images_root: str) -> str:
    """Where negatives for `root` live under `images_root`: all of it when it lies inside the labels'
    root, else only the part that mirrors the root (labels/train must not pull in images/val)."""
    if images_root == root or images_root.startswith(root + "/"):
        return images_root
    # `root` runs through the same "labels" component that `images_root` ends with "images" in
    # place of, and the two names have the same length, so the rest of `root` can be cut off as is.
    return images_root + root[len(images_root):]


def _image_size(uri: str, s3: S3Options | None) -> tuple[int, int]:
    """Width and height as viewers show the image (after EXIF orientation), from its header only."""
    try:
        with storage.open_read(uri, s3) as f, Image.open(f) as image:
            width, height = image.size
            try:
                # The base class's getexif reads what the header parse found; PNG's override would
                # decode every pixel to look for an eXIf chunk after the image data.
                orientation = Image.Image.getexif(image).get(0x0112)
            except Exception:  # noqa: BLE001 - a mangled EXIF block: keep the stored orientation
                orientation = None
    except Exception as exc:  # noqa: BLE001 - PIL and fsspec raise many kinds
        raise _error(uri, f"image header unreadable ({type(exc).__name__}: {exc})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# -- shared helpers --------------------------------------------------------------------------------


def _image(image_id: int, key: str, width: int, height: int, rows: list) -> GroundTruthImage:
    """One image from (bbox_xywh, category_id, area, iscrowd) rows, in their order."""
    return GroundTruthImage(
        image_id=image_id, key=key, width=width, height=height,
        boxes_xywh=np.array([r[0] for r in rows], np.float64).reshape(-1, 4),
        category_ids=np.array([r[1] for r in rows], np.int64),
        areas=np.array([r[2] for r in rows], np.float64),
        iscrowd=np.array([r[3] for r in rows], bool),
    )


def _error(uri: str, problem: str) -> GroundTruthError:
    return GroundTruthError(f"{uri}: {' '.join(str(problem).split())}")


def _check_unique_keys(uri: str, keys: Sequence[tuple[str, str]]) -> None:
    seen: dict[str, str] = {}
    for key, where in keys:
        if key in seen:
            raise _error(uri, f"image {key!r} is named twice ({seen[key]} and {where})")
        seen[key] = where


def _key(name: Any) -> str:
    """Posix form of an image path as the labels write it: no backslashes, no leading './'."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{name!r} is not a file name")
    return PurePosixPath(name.replace("\\", "/")).as_posix()


def _int(value: Any) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
        raise TypeError(f"{value!r} is not an integer")
    return int(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(uri: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _error(uri, "not UTF-8 text") from None


def _parent(uri: str) -> str | None:
    parent = posixpath.dirname(uri)
    return parent if parent != uri and parent not in ("", "s3:", "s3:/") else None


def _parallel(fn: Callable[[_T], _R], items: list[_T]) -> list[_R]:
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(_IO_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))
