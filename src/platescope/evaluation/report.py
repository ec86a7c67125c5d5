"""The reports `evaluate` writes beside metrics.json: report.md and one self-contained report.html.

Both are rendered from the same rows (the COCO table, per class, counts), so they never disagree.
The HTML file must open anywhere, offline, forwarded by mail or served from a bucket: no external
URL at all, CSS inline, every image a data: URI. All user text (URIs, class names, keys, error
messages) is escaped, in the Markdown as well as in the HTML.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Callable
from typing import Any

from platescope import storage
from platescope.evaluation import plots
from platescope.evaluation.result import ALL_CLASSES, EvaluationResult

# pycocotools' COCOeval.summarize(): its format string and its twelve lines, in its order, under
# torchmetrics' names (result.COCO_METRIC_NAMES).
COCO_LINE = " {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}"
_COCO_ROWS = (  # (metric, AP?, IoU, area, maxDets)
    ("map", True, "0.50:0.95", "all", 100), ("map_50", True, "0.50", "all", 100),
    ("map_75", True, "0.75", "all", 100), ("map_small", True, "0.50:0.95", "small", 100),
    ("map_medium", True, "0.50:0.95", "medium", 100), ("map_large", True, "0.50:0.95", "large", 100),
    ("mar_1", False, "0.50:0.95", "all", 1), ("mar_10", False, "0.50:0.95", "all", 10),
    ("mar_100", False, "0.50:0.95", "all", 100), ("mar_small", False, "0.50:0.95", "small", 100),
    ("mar_medium", False, "0.50:0.95", "medium", 100), ("mar_large", False, "0.50:0.95", "large", 100),
)
PER_CLASS_HEADER = ("class", "AP", "AP50", "AP75", "AR100", "GT boxes", "detections",
                    "precision", "recall", "F1")
MAX_EXAMPLES = 10


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _num(value: Any) -> str:
    """Three decimals as pycocotools prints them (-1, COCO's "undefined", stays -1.000)."""
    number = _float(value)
    return "n/a" if number is None else f"{number:0.3f}"


def _int(value: Any) -> str:
    return "n/a" if value is None else str(value)


def coco_lines(metrics: dict[str, Any]) -> list[str]:
    """The twelve lines pycocotools prints; a missing number is shown as COCO's undefined, -1."""
    lines = []
    for name, is_ap, iou, area, max_dets in _COCO_ROWS:
        title, kind = ("Average Precision", "(AP)") if is_ap else ("Average Recall", "(AR)")
        value = _float(metrics.get(name))
        lines.append(COCO_LINE.format(title, kind, iou, area, max_dets, -1.0 if value is None else value))
    return lines


def _classes(metrics: dict[str, Any]) -> list[str]:
    classes = list(metrics.get("classes") or [])
    return classes + [c for c in metrics.get("per_class") or {} if c not in classes]


def per_class_rows(metrics: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name in _classes(metrics):
        pc = (metrics.get("per_class") or {}).get(name) or {}
        rows.append([
            str(name), _num(pc.get("map", metrics.get(f"map_{name}"))), _num(pc.get("map_50")),
            _num(pc.get("map_75")), _num(pc.get("mar_100", metrics.get(f"mar_100_{name}"))),
            _int(pc.get("boxes")), _int(pc.get("detections")),
            _num(pc.get("precision")), _num(pc.get("recall")), _num(pc.get("f1")),
        ])
    return rows


def counts_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The producer's counts in its order, with errors broken down by kind under `errors`."""
    rows = []
    counts = dict(metrics.get("counts") or {})
    by_kind = counts.pop("errors_by_kind", None) or {}
    for key, value in counts.items():
        rows.append((key.replace("_", " "), _int(value)))
        if key == "errors":
            rows.extend((f"errors: {kind}", _int(n)) for kind, n in sorted(by_kind.items()))
            by_kind = {}
    rows.extend((f"errors: {kind}", _int(n)) for kind, n in sorted(by_kind.items()))
    return rows


def threshold_line(metrics: dict[str, Any]) -> str | None:
    if all(metrics.get(k) is None for k in ("precision", "recall", "f1")):
        return None
    score, iou = (_float(metrics.get(k)) for k in ("score_threshold", "iou_threshold"))
    line = (f"At score ≥ {'?' if score is None else f'{score:g}'} and IoU {'?' if iou is None else f'{iou:g}'}: "
            f"precision {_num(metrics.get('precision'))}, recall {_num(metrics.get('recall'))}, "
            f"F1 {_num(metrics.get('f1'))}")
    tp, fp, fn = (metrics.get(k) for k in ("true_positives", "false_positives", "false_negatives"))
    if tp is not None or fp is not None or fn is not None:
        line += f" (true positives {_int(tp)}, false positives {_int(fp)}, false negatives {_int(fn)})"
    return line + "."


def _inputs(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("detections", metrics.get("detections")), ("ground truth", metrics.get("ground_truth")),
            ("ground-truth format", metrics.get("ground_truth_format"))]
    if metrics.get("label_map"):
        rows.append(("label map", json.dumps(metrics["label_map"], ensure_ascii=False, sort_keys=True)))
    if _float(metrics.get("elapsed_s")) is not None:
        rows.append(("elapsed", f"{float(metrics['elapsed_s']):.1f} s"))
    return [(k, str(v)) for k, v in rows if v is not None]


def _examples(metrics: dict[str, Any]) -> list[str]:
    return [str(u) for u in (metrics.get("rows_without_ground_truth_examples") or [])[:MAX_EXAMPLES]]


# ------------------------------------------------------------------------------------- Markdown


def _md(text: str) -> str:
    """Plain text in a Markdown table cell: nothing in it may become markup, a link or a new cell."""
    text = " ".join(str(text).splitlines())
    return re.sub(r"([\\`*_\[\]<>|&#~!])", r"\\\1", text)


def _code(text: str) -> str:
    """An inline code span that holds any text literally (its fence outgrows every backtick run)."""
    text = " ".join(str(text).splitlines())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _md_table(header: list[str] | tuple[str, ...], rows: list) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows]


def render_markdown(result: EvaluationResult) -> str:
    m = result.metrics
    out = ["# platescope evaluation report", ""]
    out += [f"- {name}: {_code(value)}" for name, value in _inputs(m)]
    out += ["", "## COCO metrics", "", "```text", *coco_lines(m), "```", ""]
    line = threshold_line(m)
    if line:
        out += [line, ""]
    out += ["## Per class", ""]
    if (rows := per_class_rows(m)):
        out += ["Precision, recall and F1 are at the score threshold above.", ""]
        out += [*_md_table(PER_CLASS_HEADER, rows), ""]
    else:
        out += ["No classes.", ""]
    out += ["## Counts", "", *_md_table(("count", "value"), counts_rows(m)), ""]
    if (examples := _examples(m)):
        total = (m.get("counts") or {}).get("rows_without_ground_truth", len(examples))
        out += [f"Rows without ground truth (up to {MAX_EXAMPLES} of {total}):", ""]
        out += [f"- {_code(uri)}" for uri in examples] + [""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;padding:8px;overflow-x:auto}dt{font-weight:600}dd{margin:0 0 4px 16px;word-break:break-all}
.figures{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;border:1px solid #ddd;padding:6px}
figcaption{font-size:.85em;max-width:640px;word-break:break-all}img{max-width:100%;height:auto;display:block}
.placeholder{width:320px;height:200px;background:#eee;color:#a00;padding:8px;box-sizing:border-box;overflow:auto}
.swatch{display:inline-block;width:14px;height:10px;border:3px solid;margin:0 4px 0 12px;vertical-align:middle}
.undefined{color:#999}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(table_id: str, header: list[str] | tuple[str, ...], rows: list) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td{" class=undefined" if c in ("-1.000", "n/a") else ""}>{_e(c)}</td>'
                         for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(data: bytes, mime: str, alt: str, width: int | None = None, height: int | None = None) -> str:
    size = f' width="{width}" height="{height}"' if width and height else ""
    return f'<img src="data:{mime};base64,{base64.b64encode(data).decode()}" alt="{_e(alt)}"{size}>'


def _curve_names(curves: dict, classes: list[str]) -> list[str]:
    first = [ALL_CLASSES] if ALL_CLASSES in curves else []
    return first + [c for c in classes if c in curves] + sorted(c for c in curves if c not in classes + first)


def _plots_section(section_id: str, title: str, figures: list[str]) -> str:
    body = f'<div class="figures">{"".join(figures)}</div>' if figures else "<p>No curves.</p>"
    return f'<section id="{section_id}"><h2>{_e(title)}</h2>{body}</section>'


def _plot_figures(result: EvaluationResult) -> tuple[list[str], list[str]]:
    classes, threshold = _classes(result.metrics), _float(result.metrics.get("score_threshold"))
    pr, th = [], []
    for name in _curve_names(result.pr_curves, classes):
        label = "all classes" if name == ALL_CLASSES else name
        png = plots.pr_curve_png(label, result.pr_curves[name])
        alt = f"Precision-recall curve of {label} at IoU 0.50"
        pr.append(f"<p>{_e(label)}: precision undefined (no ground-truth boxes).</p>" if png is None else
                  f"<figure>{_img(png, 'image/png', alt)}<figcaption>{_e(alt)}</figcaption></figure>")
    for name in _curve_names(result.threshold_curves, classes):
        label = "all classes" if name == ALL_CLASSES else name
        alt = f"Precision, recall and F1 of {label} against the score threshold (IoU 0.50)"
        if (png := plots.threshold_curve_png(label, result.threshold_curves[name], threshold)) is not None:
            th.append(f"<figure>{_img(png, 'image/png', alt)}<figcaption>{_e(alt)}</figcaption></figure>")
    return pr, th


def _gallery(result: EvaluationResult, read_image: Callable[[str], bytes]) -> str:
    gt, pred = (f"rgb{c}" for c in (plots.GT_COLOUR, plots.PRED_COLOUR))
    parts = ['<section id="gallery"><h2>Worst images</h2>',
             (f'<p class="legend">Boxes:<span class="swatch" style="border-color:{gt}"></span>ground truth'
              f'<span class="swatch" style="border-color:{pred}"></span>prediction (label and score)</p>')]
    if not result.worst_images:
        parts.append("<p>No images.</p>")
    figures = []
    for ex in result.worst_images:
        caption = (f"<figcaption><strong>{_e(ex.key)}</strong>: missed {ex.missed}, "
                   f"false alarms {ex.false_alarms}<br>{_e(ex.source_uri)}</figcaption>")
        try:
            data, width, height = plots.annotated_image(ex, read_image)
        except Exception as exc:  # noqa: BLE001 - one unreadable image must not cost the whole report
            figures.append(f'<figure class="failed"><div class="placeholder" role="img" '
                           f'aria-label="{_e(ex.key)} could not be shown">Could not show this image: '
                           f"{_e(type(exc).__name__)}: {_e(exc)}</div>{caption}</figure>")
            continue
        alt = (f"{ex.key}: {len(ex.gt_boxes)} ground-truth boxes and {len(ex.pred_boxes)} predictions; "
               f"missed {ex.missed}, false alarms {ex.false_alarms}")
        figures.append(f"<figure>{_img(data, 'image/jpeg', alt, width, height)}{caption}</figure>")
    parts.append(f'<div class="figures">{"".join(figures)}</div></section>')
    return "".join(parts)


def render_html(result: EvaluationResult, *, read_image: Callable[[str], bytes]) -> str:
    m = result.metrics
    coco = [[("AP" if is_ap else "AR"), iou, area, str(dets), _num(m.get(name))]
            for name, is_ap, iou, area, dets in _COCO_ROWS]
    inputs = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in _inputs(m))
    line = threshold_line(m)
    examples = _examples(m)
    pr, th = _plot_figures(result)
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>platescope evaluation report</title><style>{_CSS}</style></head><body>",
        f"<h1>platescope evaluation report</h1><dl>{inputs}</dl>",
        '<section id="coco"><h2>COCO metrics</h2>',
        _html_table("coco-table", ("metric", "IoU", "area", "maxDets", "value"), coco),
        f'<pre id="coco-text">{_e(chr(10).join(coco_lines(m)))}</pre>',
        f"<p>{_e(line)}</p>" if line else "", "</section>",
        '<section id="per-class"><h2>Per class</h2>',
        "<p>Precision, recall and F1 are at the score threshold above.</p>",
        _html_table("per-class-table", PER_CLASS_HEADER, per_class_rows(m)), "</section>",
        '<section id="counts"><h2>Counts</h2>',
        _html_table("counts-table", ("count", "value"), counts_rows(m)),
    ]
    if examples:
        total = (m.get("counts") or {}).get("rows_without_ground_truth", len(examples))
        parts.append(f"<p>Rows without ground truth (up to {MAX_EXAMPLES} of {_e(total)}):</p><ul>"
                     + "".join(f"<li>{_e(u)}</li>" for u in examples) + "</ul>")
    parts += ["</section>", _plots_section("pr-curves", "Precision-recall curves", pr),
              _plots_section("threshold-curves", "Score-threshold curves", th),
              _gallery(result, read_image), "</body></html>"]
    return "\n".join(p for p in parts if p)


def write_reports(result: EvaluationResult, output: str, *, read_image: Callable[[str], bytes],
                  s3: storage.S3Options | None = None) -> dict[str, str]:
    """metrics.json, report.md and report.html into the folder `output` (local or s3://)."""
    contents = {
        "metrics.json": json.dumps(result.metrics, indent=2),
        "report.md": render_markdown(result),
        "report.html": render_html(result, read_image=read_image),
    }
    written = {}
    for name, text in contents.items():
        uri = storage.join(output, name)
        storage.write_bytes_atomic(uri, text.encode("utf-8"), s3)
        written[name] = uri
    return written
