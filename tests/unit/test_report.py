"""The evaluate reports: Markdown parity with pycocotools, a self-contained HTML, and a real browser.

The browser test opens report.html in headless Chromium and checks the rendered DOM and a
screenshot. Without a browser it skips, unless PLATESCOPE_REQUIRE_BROWSER=1 (CI) makes it fail.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from platescope.evaluation import plots
from platescope.evaluation.report import render_html, render_markdown, write_reports
from platescope.evaluation.result import (
    ALL_CLASSES,
    COCO_METRIC_NAMES,
    EvaluationResult,
    ImageExample,
    PrecisionRecallCurve,
    ThresholdCurve,
)

CLASSES = ["licence_plate", "car"]


def _metrics(classes: list[str] = CLASSES) -> dict:
    metrics = dict(zip(COCO_METRIC_NAMES, [0.5, 0.8, 0.4, -1.0, 0.45, 0.6, 0.3, 0.5, 0.55, -1.0, 0.5, 0.7]))
    per_class = {}
    for i, name in enumerate(classes):
        ap = -1.0 if i == 1 else 0.5
        metrics[f"map_{name}"], metrics[f"mar_100_{name}"] = ap, 0.6
        per_class[name] = {"map": ap, "map_50": 0.8, "map_75": 0.4, "mar_100": 0.6, "boxes": 10 + i,
                           "detections": 12 + i, "precision": 0.75, "recall": 0.6, "f1": 0.666666}
    metrics.update({
        "classes": list(classes), "per_class": per_class, "score_threshold": 0.3, "iou_threshold": 0.5,
        "precision": 0.8125, "recall": 0.7, "f1": 0.752, "true_positives": 7, "false_positives": 2,
        "false_negatives": 3,
        "counts": {"images": 20, "images_with_rows": 19, "images_missed": 1, "boxes": 21, "detections": 25,
                   "rows": 22, "errors": 3, "errors_by_kind": {"corrupt_image": 2, "truncated_image": 1},
                   "rows_without_ground_truth": 12, "duplicate_rows": 0},
        "rows_without_ground_truth_examples": [f"s3://bucket/extra/{i}.jpg" for i in range(12)],
        "detections": "s3://bucket/runs/r1/detections", "ground_truth": "s3://bucket/gt/instances.json",
        "ground_truth_format": "coco", "label_map": {"0": "licence_plate"}, "elapsed_s": 12.5,
    })
    return metrics


def _curves(classes: list[str]) -> tuple[dict, dict]:
    recall = [i / 100 for i in range(101)]
    pr = {name: PrecisionRecallCurve(recall, [max(0.0, 1 - r * r) for r in recall])
          for name in [*classes, ALL_CLASSES]}
    pr[classes[-1]] = PrecisionRecallCurve(recall, [-1.0] * 101)  # no ground truth: not drawn
    score = [i / 20 for i in range(21)]
    th = {name: ThresholdCurve(score, [0.5 + s / 2 for s in score], [1 - s for s in score],
                               [0.6 - abs(s - 0.4) for s in score]) for name in [*classes, ALL_CLASSES]}
    return pr, th


def _write_image(path: Path, width: int = 320, height: int = 240) -> None:
    image = Image.new("RGB", (width, height), (90, 100, 120))
    draw = ImageDraw.Draw(image)
    for x in range(0, width, 16):
        draw.line((x, 0, x, height), fill=(110, 115, 130))
    draw.rectangle((60, 100, 180, 140), fill=(230, 230, 230), outline=(20, 20, 20))
    image.save(path)


def _example(path: Path, key: str, label: str = "licence_plate") -> ImageExample:
    return ImageExample(
        source_uri=str(path), key=key, width=320, height=240,
        gt_boxes=[[60, 100, 180, 140], [200, 30, 300, 90]], gt_labels=[label, label],
        pred_boxes=[[64, 104, 184, 144], [10, 180, 110, 230]], pred_scores=[0.91, 0.42],
        pred_labels=[label, label], missed=1, false_alarms=1,
    )


def _read(uri: str) -> bytes:
    return Path(uri).read_bytes()


@pytest.fixture
def result(tmp_path: Path) -> EvaluationResult:
    pr, th = _curves(CLASSES)
    examples = []
    for i in range(3):
        path = tmp_path / f"img {i}.png"
        _write_image(path)
        examples.append(_example(path, f"cam/img {i}.png"))
    return EvaluationResult(_metrics(), pr_curves=pr, threshold_curves=th, worst_images=examples)


class _Dom(HTMLParser):
    """Rows of each table body, images of each section, every URL-bearing attribute, all tags."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, int] = {}
        self.images: dict[str, list[dict]] = {}
        self.urls: list[str] = []
        self.tags: list[str] = []
        self._table = self._section = None
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        self.tags.append(tag)
        self.urls += [v or "" for k, v in attrs.items() if k in ("src", "href", "srcset", "action", "poster")]
        if tag == "table":
            self._table = attrs.get("id")
            self.rows.setdefault(self._table, 0)
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows[self._table] += 1
        elif tag == "section":
            self._section = attrs.get("id")
            self.images.setdefault(self._section, [])
        elif tag == "img":
            self.images.setdefault(self._section, []).append(attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_body = False
        elif tag == "section":
            self._section = None


def _parse(text: str) -> _Dom:
    dom = _Dom()
    dom.feed(text)
    dom.close()
    return dom


def _pycocotools_summary() -> tuple[list[float], list[str]]:
    """A real COCOeval on two images, two classes, no small boxes (so some numbers are -1)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        gt = COCO()
        gt.dataset = {
            "images": [{"id": 1, "width": 640, "height": 480}, {"id": 2, "width": 640, "height": 480}],
            "categories": [{"id": 1, "name": "licence_plate"}, {"id": 2, "name": "car"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [100, 100, 60, 20], "area": 1200, "iscrowd": 0},
                {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 300, 200], "area": 60000, "iscrowd": 0},
                {"id": 3, "image_id": 2, "category_id": 1, "bbox": [300, 300, 80, 25], "area": 2000, "iscrowd": 0},
            ],
        }
        gt.createIndex()
        dt = gt.loadRes([
            {"image_id": 1, "category_id": 1, "bbox": [102, 101, 60, 20], "score": 0.9},
            {"image_id": 1, "category_id": 2, "bbox": [60, 70, 280, 190], "score": 0.7},
            {"image_id": 2, "category_id": 1, "bbox": [10, 10, 80, 25], "score": 0.8},
            {"image_id": 2, "category_id": 1, "bbox": [305, 302, 80, 25], "score": 0.4},
        ])
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ev.summarize()
    return [float(s) for s in ev.stats], out.getvalue().splitlines()


def _md_section(md: str, title: str) -> list[str]:
    lines = md.splitlines()
    start = lines.index(f"## {title}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start + 1:end]


def _md_table_rows(lines: list[str]) -> list[list[str]]:
    rows = [line for line in lines if line.startswith("|")][2:]  # past header and rule
    return [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def test_markdown_coco_block_matches_pycocotools_line_for_line() -> None:
    stats, printed = _pycocotools_summary()
    assert len(printed) == 12 and -1.0 in stats  # the case exercises COCO's "undefined"
    metrics = dict(zip(COCO_METRIC_NAMES, stats))
    md = render_markdown(EvaluationResult(metrics))
    lines = md.splitlines()
    start = lines.index("```text") + 1
    block = lines[start:lines.index("```", start)]
    assert block == printed
    assert any(line.endswith("= -1.000") for line in block)


def test_markdown_tables_and_threshold_line() -> None:
    md = render_markdown(EvaluationResult(_metrics()))
    assert "s3://bucket/runs/r1/detections" in md and "s3://bucket/gt/instances.json" in md
    rows = _md_table_rows(_md_section(md, "Per class"))
    assert rows == [
        [r"licence\_plate", "0.500", "0.800", "0.400", "0.600", "10", "12", "0.750", "0.600", "0.667"],
        ["car", "-1.000", "0.800", "0.400", "0.600", "11", "13", "0.750", "0.600", "0.667"],
    ]
    counts = dict(_md_table_rows(_md_section(md, "Counts")))
    assert counts["errors"] == "3" and counts[r"errors: corrupt\_image"] == "2"
    assert counts["rows without ground truth"] == "12"
    shown = [u for u in md.splitlines() if u.startswith("- `s3://bucket/extra/")]
    assert len(shown) == 10
    assert ("At score ≥ 0.3 and IoU 0.5: precision 0.812, recall 0.700, F1 0.752 "
            "(true positives 7, false positives 2, false negatives 3).") in md


def test_markdown_tolerates_missing_optional_parts() -> None:
    md = render_markdown(EvaluationResult({"map": 0.25}))
    assert " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.250" in md
    assert "No classes." in md
    html_text = render_html(EvaluationResult({"map": 0.25}), read_image=_read)
    assert 'id="gallery"' in html_text and "No curves." in html_text


def test_html_is_self_contained(result: EvaluationResult) -> None:
    text = render_html(result, read_image=_read)
    dom = _parse(text)
    assert dom.urls, "expected images"
    for url in dom.urls:
        assert not url.lower().startswith(("http:", "https:", "//", "file:")), url[:80]
        assert url.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")), url[:80]
    assert not {"script", "link", "iframe", "object", "embed"} & set(dom.tags)
    outside_data = re.sub(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", "", text)
    for needle in ("http:", "https:", "file:", "@import", "url("):
        assert needle not in outside_data
    assert dom.rows == {"coco-table": 12, "per-class-table": 2, "counts-table": 11}
    assert len(dom.images["pr-curves"]) == 2  # "all" and licence_plate; car has no defined point
    assert len(dom.images["threshold-curves"]) == 3
    assert len(dom.images["gallery"]) == 3
    assert all(img.get("alt") for imgs in dom.images.values() for img in imgs)


def test_html_escapes_user_text(tmp_path: Path) -> None:
    label = "<b>plate</b>"
    path = tmp_path / "a.png"
    _write_image(path)
    example = _example(path, 'cam/"><script>alert(1)</script>.png', label=label)
    pr, th = _curves([label, "car"])
    metrics = _metrics([label, "car"])
    metrics["detections"] = "s3://b/<i>x</i>"
    res = EvaluationResult(metrics, pr_curves=pr, threshold_curves=th, worst_images=[example])
    text = render_html(res, read_image=lambda uri: path.read_bytes())
    dom = _parse(text)
    assert not {"b", "i", "script"} & set(dom.tags)
    assert "&lt;b&gt;plate&lt;/b&gt;" in text and "&lt;script&gt;" in text
    md = render_markdown(res)
    assert "<b>" not in md and "<i>" not in md.replace("`s3://b/<i>x</i>`", "")


def test_gallery_placeholder_when_an_image_cannot_be_read(result: EvaluationResult, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result.worst_images.append(_example(broken, "broken.jpg"))
    result.worst_images.append(_example(tmp_path / "missing.png", "missing & gone.png"))
    text = render_html(result, read_image=_read)
    assert len(_parse(text).images["gallery"]) == 3
    assert text.count('class="placeholder"') == 2
    assert "InputError: truncated_image" in text and "FileNotFoundError" in text
    assert "missing &amp; gone.png" in text


def test_gallery_image_follows_exif_orientation(tmp_path: Path) -> None:
    # Stored 200 x 100, EXIF says "rotate 90 clockwise": viewers (and the boxes) see 100 x 200.
    stored = Image.new("RGB", (200, 100), (90, 100, 120))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif)
    example = ImageExample(str(path), "rotated.jpg", 100, 200, [[20, 20, 80, 180]], ["p"], [], [], [], 1, 0)
    data, width, height = plots.annotated_image(example, _read)
    assert (width, height) == (100, 200)
    pixel = Image.open(io.BytesIO(data)).convert("RGB").getpixel((21, 100))
    assert all(abs(a - b) < 40 for a, b in zip(pixel, plots.GT_COLOUR)), pixel


def test_write_reports(result: EvaluationResult, tmp_path: Path) -> None:
    out = tmp_path / "eval out"
    written = write_reports(result, str(out), read_image=_read)
    assert set(written) == {"metrics.json", "report.md", "report.html"}
    assert json.loads((out / "metrics.json").read_text()) == result.metrics
    assert written["report.md"] == str(out / "report.md")
    assert (out / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


# ----------------------------------------------------------------------------------- browser


def find_browser() -> str:
    """A Chromium-family browser on PATH; skips without one, fails when CI requires it."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if (path := shutil.which(name)):
            return path
    reason = "no chromium, chromium-browser or google-chrome on PATH"
    if os.environ.get("PLATESCOPE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and PLATESCOPE_REQUIRE_BROWSER=1 requires one")
    pytest.skip(reason)


def _chromium(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chrome'}", *args]
    proc = subprocess.run(cmd, check=False, capture_output=True, timeout=60, env={**os.environ, "HOME": str(home)})
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return proc


def _near(pixel: tuple[int, ...], colour: tuple[int, int, int], tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour))


def test_report_renders_in_a_real_browser(result: EvaluationResult, tmp_path: Path) -> None:
    browser = find_browser()
    out = tmp_path / "report"
    write_reports(result, str(out), read_image=_read)
    url = (out / "report.html").resolve().as_uri()

    dom = _parse(_chromium(browser, tmp_path, "--dump-dom", url).stdout.decode("utf-8"))
    assert dom.rows == {"coco-table": 12, "per-class-table": 2, "counts-table": 11}
    assert len(dom.images["pr-curves"]) == 2 and len(dom.images["threshold-curves"]) == 3
    assert len(dom.images["gallery"]) == 3
    for img in (img for imgs in dom.images.values() for img in imgs):
        assert img["src"].startswith("data:image/") and img.get("alt")

    shot = tmp_path / "shot.png"
    _chromium(browser, tmp_path, f"--screenshot={shot}", "--window-size=1280,4000", url)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 4000)
    colours = image.getcolors(maxcolors=1 << 24)
    assert len(colours) > 50, "the page looks blank"
    # The legend swatches hold ~200 pixels of each colour; thousands mean the boxes were drawn.
    gt = sum(n for n, c in colours if _near(c, plots.GT_COLOUR))
    pred = sum(n for n, c in colours if _near(c, plots.PRED_COLOUR))
    assert gt > 2000 and pred > 2000, (gt, pred)
    # The gallery's photos decoded and show: their background colour is nowhere else on the page.
    background = sum(n for n, c in colours if _near(c, (90, 100, 120), tolerance=6))
    assert background > 3 * 320 * 240 // 3, background


def test_an_evaluated_dataset_report_renders_with_its_curves_and_photos(tmp_path: Path) -> None:
    """The report evaluate writes for real images and a table, not a hand-built result."""
    from platescope import samples
    from platescope.config import EvaluateConfig
    from platescope.evaluation.run import evaluate_and_report
    from platescope.evaluation.simulate import simulate_rows, write_detections

    browser = find_browser()
    labels = samples.write_image_dataset(tmp_path / "images", 10, seed=9, size=(320, 240))
    coco = json.loads(labels.read_text())
    write_detections(simulate_rows(coco, root=str(tmp_path / "images"), seed=3, miss_rate=0.3), tmp_path / "run")
    _, written = evaluate_and_report(EvaluateConfig(
        detections=str(tmp_path / "run"), ground_truth=str(labels), output=str(tmp_path / "report"),
        num_worst_images=4))
    url = Path(written["report.html"]).resolve().as_uri()

    dom = _parse(_chromium(browser, tmp_path, "--dump-dom", url).stdout.decode("utf-8"))
    assert dom.rows["coco-table"] == 12 and dom.rows["per-class-table"] == 1
    assert len(dom.images["pr-curves"]) == 1 and len(dom.images["threshold-curves"]) == 1
    assert len(dom.images["gallery"]) == 4

    shot = tmp_path / "shot.png"
    _chromium(browser, tmp_path, f"--screenshot={shot}", "--window-size=1280,4000", url)
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 24)
    counts = {name: sum(n for n, c in colours if _near(c, rgb, tolerance=30)) for name, rgb in {
        "precision line": (31, 95, 191), "recall line": (224, 123, 0),
        "ground truth": plots.GT_COLOUR, "predictions": plots.PRED_COLOUR}.items()}
    # Lines two pixels wide over a plot's width: hundreds of pixels each, where a missing plot gives 0.
    assert all(n > 300 for n in counts.values()), counts
