"""Ground-truth readers: one synthetic dataset written as COCO, YOLO and VOC must read the same."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pytest
from PIL import Image

from platescope import samples, storage
from platescope.evaluation.groundtruth import GroundTruth, GroundTruthError, read_ground_truth

SIZE = (160, 120)


# -- writers: the sample COCO dataset converted to YOLO and VOC ----------------------------------


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, dict]:
    """4 scenes, two categories, the last image without boxes; images beside annotations.json."""
    path = samples.write_image_dataset(tmp_path / "coco", 4, seed=3, size=SIZE)
    data = json.loads(path.read_text())
    data["categories"].append({"id": 2, "name": "sign"})
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 4]
    for ann in data["annotations"][::2]:
        ann["category_id"] = 2
    path.write_text(json.dumps(data))
    return path, data


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _yolo_line(ann: dict, width: int, height: int, class_index: int) -> str:
    x, y, w, h = ann["bbox"]
    return f"{class_index} {(x + w / 2) / width!r} {(y + h / 2) / height!r} {w / width!r} {h / height!r}"


def write_yolo(coco: tuple[Path, dict], dest: Path, *, beside: bool = False, sub: str = "") -> Path:
    """YOLO labels for the COCO dataset: images/<sub> + labels/<sub>, or both in dest/<sub>;
    no label file for images without boxes; classes.txt in dest."""
    src, data = coco
    order = sorted(c["id"] for c in data["categories"])
    for image in data["images"]:
        image_dir = dest / sub if beside else dest / "images" / sub
        label_dir = dest / sub if beside else dest / "labels" / sub
        image_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(src.parent / image["file_name"], image_dir / image["file_name"])
        lines = [_yolo_line(a, image["width"], image["height"], order.index(a["category_id"]))
                 for a in data["annotations"] if a["image_id"] == image["id"]]
        if lines:
            _write(label_dir / (Path(image["file_name"]).stem + ".txt"), "\n".join(lines) + "\n")
    names = {c["id"]: c["name"] for c in data["categories"]}
    _write(dest / "classes.txt", "".join(f"{names[i]}\n" for i in order))
    return dest


def voc_xml(filename: str, size: tuple[int, int], objects: list[tuple[str, list[float], int]]) -> str:
    body = "".join(
        f"<object><name>{escape(name)}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for name, (x0, y0, x1, y1), difficult in objects
    )
    return (f"<annotation><folder>JPEGImages</folder><filename>{escape(filename)}</filename>"
            f"<path>C:\\Users\\someone\\{escape(filename)}</path><size><width>{size[0]}</width>"
            f"<height>{size[1]}</height><depth>3</depth></size>{body}</annotation>")


def write_voc(coco: tuple[Path, dict], dest: Path) -> Path:
    _, data = coco
    names = {c["id"]: c["name"] for c in data["categories"]}
    for image in data["images"]:
        objects = [(names[a["category_id"]], [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                              a["bbox"][1] + a["bbox"][3]], 0)
                   for a in data["annotations"] if a["image_id"] == image["id"]]
        xml = voc_xml(image["file_name"], (image["width"], image["height"]), objects)
        _write(dest / (Path(image["file_name"]).stem + ".xml"), xml)
    return dest


def _named_boxes(gt: GroundTruth) -> dict[str, tuple[int, int, list[str], np.ndarray]]:
    return {i.key: (i.width, i.height, [gt.categories[c] for c in i.category_ids], i.boxes_xywh)
            for i in gt.images}


# -- one dataset, three formats --------------------------------------------------------------------


def test_same_dataset_reads_the_same_in_all_three_formats(coco, tmp_path):
    path, data = coco
    from_coco = read_ground_truth(str(path))
    from_yolo = read_ground_truth(str(write_yolo(coco, tmp_path / "yolo")))
    from_voc = read_ground_truth(str(write_voc(coco, tmp_path / "voc")))

    assert (from_coco.format, from_yolo.format, from_voc.format) == ("coco", "yolo", "voc")
    assert from_coco.num_boxes == from_yolo.num_boxes == from_voc.num_boxes == len(data["annotations"]) > 2
    assert sorted(from_coco.categories.values()) == sorted(from_yolo.categories.values()) == \
        sorted(from_voc.categories.values()) == ["licence_plate", "sign"]
    expected = _named_boxes(from_coco)
    assert list(expected) == [f"scene_{i:05d}.jpg" for i in range(1, 5)]
    assert expected["scene_00004.jpg"][3].shape == (0, 4)  # the image without boxes is still there
    for other, tolerance in ((from_yolo, 1e-6), (from_voc, 0.0)):
        got = _named_boxes(other)
        assert list(got) == list(expected)
        assert [i.image_id for i in other.images] == [1, 2, 3, 4]
        for key, (width, height, names, boxes) in expected.items():
            assert got[key][:3] == (width, height, names)
            np.testing.assert_allclose(got[key][3], boxes, rtol=0, atol=tolerance)
        for image in other.images:
            assert image.boxes_xywh.dtype == np.float64 and image.category_ids.dtype == np.int64
            np.testing.assert_allclose(image.areas, image.boxes_xywh[:, 2] * image.boxes_xywh[:, 3])
            assert image.iscrowd.dtype == bool and not image.iscrowd.any()


# -- COCO -----------------------------------------------------------------------------------------


def test_coco_keeps_floats_area_iscrowd_and_file_order(tmp_path):
    data = {
        "images": [{"id": 9, "file_name": "./sub\\b.jpg", "width": 640, "height": 480},
                   {"id": 3, "file_name": "a.jpg", "width": 320, "height": 240}],
        "annotations": [
            {"id": 1, "image_id": 9, "category_id": 7, "bbox": [10.123456789012345, 20.5, 30.25, 0.1],
             "area": 999.125, "iscrowd": 1},
            {"id": 2, "image_id": 3, "category_id": 3, "bbox": [1, 2, 3, 4]},
            {"id": 3, "image_id": 9, "category_id": 3, "bbox": [0.1, 0.2, 0.3, 0.7], "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "plate"}, {"id": 3, "name": "car"}],
    }
    path = _write(tmp_path / "gt.json", json.dumps(data))

    gt = read_ground_truth(str(path), format="coco")

    assert gt.categories == {7: "plate", 3: "car"}
    assert [(i.image_id, i.key, i.width, i.height) for i in gt.images] == [(3, "a.jpg", 320, 240),
                                                                            (9, "sub/b.jpg", 640, 480)]
    a, b = gt.images
    assert b.boxes_xywh.tolist() == [[10.123456789012345, 20.5, 30.25, 0.1], [0.1, 0.2, 0.3, 0.7]]
    assert b.category_ids.tolist() == [7, 3] and b.iscrowd.tolist() == [True, False]
    assert b.areas.tolist() == [999.125, 0.3 * 0.7]  # given area kept; missing area = w * h exactly
    assert a.areas.tolist() == [12.0] and a.boxes_xywh.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert gt.num_boxes == 3 and gt.uri == str(path)


# -- YOLO -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("names_file", ["classes.txt", "obj.names", "data.yaml list", "dataset.yaml mapping",
                                        "data.yaml in parent"])
def test_yolo_class_names_files(coco, tmp_path, names_file):
    root = write_yolo(coco, tmp_path / "ds")
    (root / "classes.txt").unlink()
    uri = root
    if names_file == "obj.names":
        _write(root / "obj.names", "licence_plate\nsign\n\n")
    elif names_file == "data.yaml list":
        _write(root / "data.yaml", "path: .\ntrain: images\nnames: [licence_plate, sign]\n")
    elif names_file == "dataset.yaml mapping":
        _write(root / "dataset.yaml", "names:\n  0: licence_plate\n  1: sign\nnc: 2\n")
    elif names_file == "data.yaml in parent":
        _write(root / "data.yaml", "names:\n  - licence_plate\n  - sign\n")
        uri = root / "labels"
    else:
        _write(root / "classes.txt", "licence_plate\nsign\n")

    gt = read_ground_truth(str(uri))

    assert gt.format == "yolo" and gt.categories == {1: "licence_plate", 2: "sign"}
    assert gt.num_boxes == len(coco[1]["annotations"])


def test_yolo_without_names_says_what_it_looked_for(coco, tmp_path):
    root = write_yolo(coco, tmp_path / "ds")
    (root / "classes.txt").unlink()
    with pytest.raises(GroundTruthError, match=r"classes\.txt, obj\.names, data\.yaml, dataset\.yaml") as info:
        read_ground_truth(str(root / "labels"))
    assert str(root / "labels") in str(info.value) and str(root) in str(info.value)


def test_yolo_layouts_give_keys_relative_to_the_images_root(coco, tmp_path):
    split = write_yolo(coco, tmp_path / "split", sub="train")
    _write(split / "images" / "val" / "other.jpg", (split / "images" / "train" / "scene_00001.jpg").read_bytes())
    (split / "labels" / "train" / "scene_00001.txt").write_text("")  # empty label file: no boxes
    beside = write_yolo(coco, tmp_path / "beside", beside=True, sub="cam1")

    whole = read_ground_truth(str(split))
    from_labels = read_ground_truth(str(split / "labels"))
    only_train = read_ground_truth(str(split / "labels" / "train"), format="yolo")
    side = read_ground_truth(str(beside))

    train_keys = [f"train/scene_{i:05d}.jpg" for i in range(1, 5)]
    assert [i.key for i in whole.images] == [i.key for i in from_labels.images] == train_keys + ["val/other.jpg"]
    assert [i.key for i in only_train.images] == train_keys  # labels/train does not pull in images/val
    assert [i.key for i in side.images] == [f"cam1/scene_{i:05d}.jpg" for i in range(1, 5)]
    counts = {i.key: len(i.boxes_xywh) for i in whole.images}
    assert counts["train/scene_00001.jpg"] == 0 and counts["val/other.jpg"] == 0
    assert counts["train/scene_00004.jpg"] == 0  # no label file at all: a negative image
    assert whole.num_boxes == len(coco[1]["annotations"]) - len(
        [a for a in coco[1]["annotations"] if a["image_id"] == 1])
    assert side.num_boxes == len(coco[1]["annotations"])


def test_yolo_image_size_follows_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 160 x 80, shown rotated: 80 wide, 160 high
    (tmp_path / "images").mkdir()
    Image.new("RGB", (160, 80), (90, 90, 90)).save(tmp_path / "images" / "r.jpg", exif=exif.tobytes())
    Image.new("RGB", (50, 40)).save(tmp_path / "images" / "p.png")
    _write(tmp_path / "labels" / "r.txt", "0 0.5 0.25 0.5 0.25\n")
    _write(tmp_path / "classes.txt", "plate\n")

    gt = read_ground_truth(str(tmp_path))

    p, r = gt.images
    assert (p.key, p.width, p.height) == ("p.png", 50, 40)
    assert (r.key, r.width, r.height) == ("r.jpg", 80, 160)
    assert r.boxes_xywh.tolist() == [[20.0, 20.0, 40.0, 40.0]]


def test_yolo_image_list_files_are_not_labels(coco, tmp_path):
    root = write_yolo(coco, tmp_path / "ds")
    _write(root / "train.txt", "./images/scene_00001.jpg\n./images/scene_00002.jpg\n")
    assert read_ground_truth(str(root)).num_boxes == len(coco[1]["annotations"])


# -- VOC ------------------------------------------------------------------------------------------


def test_voc_difficult_nested_folders_and_single_file(tmp_path):
    _write(tmp_path / "a.xml", voc_xml("a.jpg", (100, 80), [("plate", [1.5, 2, 11.5, 12], 0)]))
    _write(tmp_path / "cam" / "day" / "b.xml",
           voc_xml("b.jpg", (64, 48), [("plate", [0, 0, 10, 10], 1), ("car", [5, 5, 60, 40], 0)]))

    gt = read_ground_truth(str(tmp_path))

    assert gt.format == "voc" and gt.categories == {1: "car", 2: "plate"}
    a, b = gt.images
    assert (a.image_id, a.key, a.width, a.height) == (1, "a.jpg", 100, 80)
    assert a.boxes_xywh.tolist() == [[1.5, 2.0, 10.0, 10.0]] and a.areas.tolist() == [100.0]
    assert (b.image_id, b.key, b.width, b.height) == (2, "cam/day/b.jpg", 64, 48)
    assert b.iscrowd.tolist() == [True, False] and b.category_ids.tolist() == [2, 1]
    assert b.boxes_xywh.tolist() == [[0, 0, 10, 10], [5, 5, 55, 35]]

    single = read_ground_truth(str(tmp_path / "cam" / "day" / "b.xml"))
    assert [i.key for i in single.images] == ["b.jpg"] and single.categories == {1: "car", 2: "plate"}


def test_voc_rejects_doctype(tmp_path):
    bomb = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>'
            "<annotation><filename>&lol2;</filename></annotation>")
    path = _write(tmp_path / "x.xml", bomb)
    with pytest.raises(GroundTruthError, match="DOCTYPE"):
        read_ground_truth(str(path))
    _write(tmp_path / "u16.xml", bomb.replace('"1.0"?>', '"1.0" encoding="utf-16"?>').encode("utf-16"))
    with pytest.raises(GroundTruthError, match="DOCTYPE"):
        read_ground_truth(str(tmp_path / "u16.xml"))


# -- errors name the file (and line) ----------------------------------------------------------------

GOOD_COCO = {"images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
             "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}],
             "categories": [{"id": 1, "name": "plate"}]}


def _coco_with(**changes) -> str:
    data = json.loads(json.dumps(GOOD_COCO))
    for path, value in changes.items():
        section, field = path.split("__")
        if field == "DROP":
            del data[section]
        elif section == "extra":
            data[field].append(value)
        else:
            data[section][0][field] = value
    return json.dumps(data)


@pytest.mark.parametrize(("text", "fragment"), [
    ("{not json", "not JSON"),
    (_coco_with(annotations__DROP=None), "'annotations'"),
    (_coco_with(annotations__image_id=2), "annotation 5: unknown image_id 2"),
    (_coco_with(annotations__category_id=4), "annotation 5: unknown category_id 4"),
    (_coco_with(annotations__bbox=[1, 2, 3]), "annotation 5: bbox [1, 2, 3] is not 4 numbers"),
    (_coco_with(annotations__bbox=[1, 2, "3", 4]), "is not 4 numbers"),
    (_coco_with(annotations__bbox=[1, 2, -3, 4]), "annotation 5: bbox [1, 2, -3, 4] has a negative"),
    (_coco_with(extra__images={"id": 1, "file_name": "b.jpg", "width": 1, "height": 1}), "duplicate image id 1"),
    (_coco_with(extra__categories={"id": 2, "name": "plate"}), "duplicate category"),
    (_coco_with(extra__images={"id": 2, "file_name": "./a.jpg", "width": 1, "height": 1}), "named twice"),
])
def test_coco_errors(tmp_path, text, fragment):
    path = _write(tmp_path / "bad.json", text)
    with pytest.raises(GroundTruthError) as info:
        read_ground_truth(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message


@pytest.mark.parametrize(("label", "fragment"), [
    ("0 0.5 0.5 0.1 0.1\n0 0.5 0.5 0.1\n", "line 2: expected 'class cx cy w h'"),
    ("\n0 0.5 0.5 0.1 x\n", "line 2: expected"),
    ("0 0.5 0.5 0.1 0.1 0.9\n", "line 1: expected"),
    ("2 0.5 0.5 0.1 0.1\n", "line 1: class 2 is not one of the 2 class names"),
    ("0.5 0.5 0.5 0.1 0.1\n", "line 1: class 0.5"),
    ("1 50 40 10 10\n", "line 1: coordinates are not normalised"),
])
def test_yolo_label_errors_name_file_and_line(tmp_path, label, fragment):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.jpg")
    label_path = _write(tmp_path / "a.txt", label)
    _write(tmp_path / "classes.txt", "plate\ncar\n")
    with pytest.raises(GroundTruthError) as info:
        read_ground_truth(str(tmp_path))
    assert str(info.value).startswith(f"{label_path} line ") and fragment in str(info.value)


def test_yolo_label_without_image(tmp_path):
    label_path = _write(tmp_path / "labels" / "a.txt", "0 0.5 0.5 0.1 0.1\n")
    _write(tmp_path / "classes.txt", "plate\n")
    with pytest.raises(GroundTruthError, match="no image with stem 'a'") as info:
        read_ground_truth(str(tmp_path))
    assert str(info.value).startswith(str(label_path))


@pytest.mark.parametrize(("xml", "fragment"), [
    ("<annotation><filename>a.jpg</filename>", "not XML"),
    ("<annotation><filename>a.jpg</filename></annotation>", "<size>"),
    ("<annotation><filename>a.jpg</filename><size><width>0</width><height>0</height></size></annotation>",
     "<size>"),
    ("<annotation><size><width>5</width><height>5</height></size></annotation>", "<filename>"),
    (voc_xml("a.jpg", (50, 50), [("plate", [1, 1, 5, 5], 0), ("plate", [10, 1, 5, 5], 0)]),
     "object 2 (plate): box 10.0,1.0,5.0,5.0"),
    (voc_xml("a.jpg", (50, 50), [("plate", [1, 1, "x", 5], 0)]), "object 1 (plate): <bndbox> needs numeric"),
    (voc_xml("a.jpg", (50, 50), [("plate", [1, 1, "nan", 5], 0)]), "object 1 (plate): <bndbox> needs numeric"),
])
def test_voc_errors(tmp_path, xml, fragment):
    _write(tmp_path / "ok.xml", voc_xml("ok.jpg", (5, 5), []))
    path = _write(tmp_path / "sub" / "bad.xml", xml)
    with pytest.raises(GroundTruthError) as info:
        read_ground_truth(str(tmp_path))
    assert str(info.value).startswith(f"{path}: ") and fragment in str(info.value)


def test_missing_unknown_and_mismatched_formats(tmp_path, coco):
    with pytest.raises(GroundTruthError, match=r"^ground truth .*nothing: not found$"):
        read_ground_truth(str(tmp_path / "nothing"))
    _write(tmp_path / "misc" / "readme.md", "hello")
    with pytest.raises(GroundTruthError, match="neither a COCO .json file nor"):
        read_ground_truth(str(tmp_path / "misc"))
    with pytest.raises(GroundTruthError, match="not yolo labels"):
        read_ground_truth(str(coco[0]), format="yolo")
    with pytest.raises(GroundTruthError, match="not coco labels"):
        read_ground_truth(str(coco[0].parent), format="coco")
    with pytest.raises(GroundTruthError, match="not voc labels"):
        read_ground_truth(str(coco[0].parent), format="voc")
    with pytest.raises(GroundTruthError, match="unknown format 'kitti'"):
        read_ground_truth(str(coco[0]), format="kitti")


# -- S3 -------------------------------------------------------------------------------------------


def test_reads_coco_yolo_and_voc_from_s3(s3_server, s3_bucket, monkeypatch, coco, tmp_path):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)  # so only the options passed can reach the server
    opts = storage.S3Options(endpoint_url=s3_server.endpoint_url, region=s3_server.region,
                             access_key_id=s3_server.access_key_id,
                             secret_access_key=s3_server.secret_access_key)
    yolo = write_yolo(coco, tmp_path / "yolo", sub="train")
    voc = write_voc(coco, tmp_path / "voc")
    for folder, prefix in ((yolo, "ds 1"), (voc, "voc #2")):
        for path in folder.rglob("*"):
            if path.is_file():
                storage.write_bytes_atomic(f"{s3_bucket}/{prefix}/{path.relative_to(folder).as_posix()}",
                                           path.read_bytes(), opts)
    storage.write_bytes_atomic(f"{s3_bucket}/gt/annotations.json", coco[0].read_bytes(), opts)

    from_coco = read_ground_truth(f"{s3_bucket}/gt/annotations.json", s3=opts)
    from_yolo = read_ground_truth(f"{s3_bucket}/ds 1/labels", s3=opts)
    from_voc = read_ground_truth(f"{s3_bucket}/voc #2", s3=opts)
    local = read_ground_truth(str(coco[0]))

    assert from_coco.uri == f"{s3_bucket}/gt/annotations.json" and from_coco.format == "coco"
    assert _named_boxes(from_coco).keys() == _named_boxes(local).keys()
    for a, b in zip(from_coco.images, local.images):
        assert (a.key, a.width, a.height, a.boxes_xywh.tolist()) == (b.key, b.width, b.height, b.boxes_xywh.tolist())
    assert from_yolo.format == "yolo" and from_yolo.categories == {1: "licence_plate", 2: "sign"}
    assert [(i.key, i.width, i.height) for i in from_yolo.images] == [
        (f"train/scene_{n:05d}.jpg", *SIZE) for n in range(1, 5)]
    assert from_yolo.num_boxes == local.num_boxes
    assert from_voc.format == "voc" and _named_boxes(from_voc).keys() == _named_boxes(local).keys()
    assert from_voc.num_boxes == local.num_boxes
    with pytest.raises(GroundTruthError, match="not found"):
        read_ground_truth(f"{s3_bucket}/nope", s3=opts)


def test_storage_failures_are_one_line_naming_the_labels(s3_server, s3_bucket, monkeypatch, coco):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    good = storage.S3Options(endpoint_url=s3_server.endpoint_url, region=s3_server.region,
                             access_key_id=s3_server.access_key_id,
                             secret_access_key=s3_server.secret_access_key)
    uri = f"{s3_bucket}/gt/annotations.json"
    storage.write_bytes_atomic(uri, coco[0].read_bytes(), good)
    wrong_secret = dataclasses.replace(good, secret_access_key="not-the-secret")
    with pytest.raises(GroundTruthError) as err:
        read_ground_truth(uri, s3=wrong_secret)
    message = str(err.value)
    assert message.startswith(f"ground truth {uri}: cannot be read (") and "\n" not in message
    assert "not-the-secret" not in message


def test_a_file_the_os_refuses_is_a_ground_truth_error(monkeypatch, coco):
    def refuse(uri, s3=None):
        raise PermissionError(13, "Permission denied", uri)

    monkeypatch.setattr(storage, "read_bytes", refuse)
    with pytest.raises(GroundTruthError, match=r"annotations\.json: cannot be read \(PermissionError: .*denied"):
        read_ground_truth(str(coco[0]))
