"""The pictures of the HTML report: curves drawn with matplotlib and the annotated worst images.

Figures are built as `matplotlib.figure.Figure` on an Agg canvas rather than through pyplot, so no
figure is ever registered in pyplot's global list: reports are made inside long-lived processes
(a Ray Train worker after every epoch), where forgotten pyplot figures pile up. Each one is still
cleared when done so its memory goes at once rather than at the next garbage collection.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from platescope.evaluation.result import ImageExample, PrecisionRecallCurve, ThresholdCurve

# Box colours of the gallery; the report's legend and the browser test use the same values.
GT_COLOUR = (0, 220, 60)
PRED_COLOUR = (255, 0, 200)
GALLERY_MAX_SIDE = 640

_FIGSIZE = (4.6, 3.4)  # inches at 100 dpi: 460 x 340 px, two or three to a row
_DPI = 100


def _title(text: str) -> str:
    # A class name is user text; a "$" would start matplotlib's mathtext and can fail to parse.
    return text.replace("$", r"\$")


def _new_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    try:
        # No "Software" metadata: it carries matplotlib's web address into the report's bytes.
        fig.savefig(buf, format="png", metadata={"Software": None})
    finally:
        fig.clear()
    return buf.getvalue()


def pr_curve_png(name: str, curve: PrecisionRecallCurve) -> bytes | None:
    """COCO's interpolated precision against recall; None when the class has no defined point."""
    points = [(r, p) for r, p in zip(curve.recall, curve.precision) if p is not None and p >= 0]
    if not points:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot([r for r, _ in points], [p for _, p in points], color="#1f5fbf", linewidth=2)
    ax.set(xlim=(0, 1.01), ylim=(0, 1.05), xlabel="recall", ylabel="precision")
    ax.set_title(_title(f"{name} (IoU 0.50)"), fontsize=11)
    ax.grid(True, alpha=0.3)
    return _png(fig)


def threshold_curve_png(name: str, curve: ThresholdCurve, threshold: float | None) -> bytes | None:
    """Precision, recall and F1 against the score threshold, with the report's threshold marked."""
    if not curve.score:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot(curve.score, curve.precision, label="precision", color="#1f5fbf", linewidth=2)
    ax.plot(curve.score, curve.recall, label="recall", color="#e07b00", linewidth=2)
    ax.plot(curve.score, curve.f1, label="F1", color="#333333", linewidth=2, linestyle="--")
    if threshold is not None:
        ax.axvline(threshold, color="#888888", linewidth=1, linestyle=":")
    ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="score threshold", ylabel="value")
    ax.set_title(_title(f"{name} (IoU 0.50)"), fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _png(fig)


def annotated_image(example: ImageExample, read_image: Callable[[str], bytes]) -> tuple[bytes, int, int]:
    """JPEG of the image with ground truth and predictions drawn, at most GALLERY_MAX_SIDE a side.

    Decoded through `decode_image` so EXIF orientation matches the boxes. Raises whatever reading
    or decoding raises; the report turns that into a placeholder.
    """
    from PIL import Image, ImageDraw, ImageFont

    from platescope.sources.images import DEFAULT_MAX_PIXELS, decode_image

    pixels = decode_image(read_image(example.source_uri), name=example.source_uri,
                          max_pixels=DEFAULT_MAX_PIXELS)
    image = Image.fromarray(pixels)
    height, width = pixels.shape[:2]
    scale = min(1.0, GALLERY_MAX_SIDE / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if scale < 1.0:
        image = image.resize(size, Image.Resampling.LANCZOS)
    # Boxes are in pixels of the image the detections table describes; if this decode came out
    # another size (it should not), stretch them onto it rather than draw them in the wrong place.
    sx = size[0] / (example.width or width)
    sy = size[1] / (example.height or height)

    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    def box(coords: list[float], colour: tuple[int, int, int], text: str, above: bool) -> None:
        x0, y0, x1, y1 = coords[0] * sx, coords[1] * sy, coords[2] * sx, coords[3] * sy
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=3)
        if text:
            try:
                left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            except (UnicodeError, OSError, ValueError):  # a label the font cannot draw
                return
            tw, th = right - left + 4, bottom - top + 4
            ty = y0 - th if above and y0 - th >= 0 else (y1 if y1 + th <= size[1] else y0)
            draw.rectangle((x0, ty, x0 + tw, ty + th), fill=colour)
            draw.text((x0 + 2 - left, ty + 2 - top), text, fill=(0, 0, 0), font=font)

    for coords, label in zip(example.gt_boxes, example.gt_labels):
        box(coords, GT_COLOUR, label, above=False)
    for coords, label, score in zip(example.pred_boxes, example.pred_labels, example.pred_scores):
        box(coords, PRED_COLOUR, f"{label} {score:.2f}", above=True)

    buf = io.BytesIO()
    # JPEG keeps a dozen photos to a few hundred kilobytes; 4:4:4 keeps the thin coloured lines true.
    image.save(buf, format="JPEG", quality=88, subsampling=0)
    return buf.getvalue(), size[0], size[1]
