"""Synthetic licence-plate data for tests, demos and benchmarks: no downloads, same bytes per seed.

The scenes are not meant to be realistic, only plate-like enough that boxes, formats and the whole
pipeline can be exercised end to end, and a tiny detector can learn something in a few steps.
`write_bad_inputs` collects one file per way an input can go wrong, so every error path is
reproducible from code rather than from a folder of hand-made files.
"""

from __future__ import annotations

import functools
import io
import json
import string
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL = "licence_plate"
_CHARS = list(string.ascii_uppercase + string.digits)


def make_scene(
    rng: np.random.Generator, width: int = 640, height: int = 480, num_plates: tuple[int, int] = (1, 3), *,
    plate_width: tuple[float, float] = (0.12, 0.3), plate_aspect: tuple[float, float] = (2.5, 4.5),
    min_plate: tuple[int, int] = (40, 12),
) -> tuple[np.ndarray, list[list[float]], list[str]]:
    """An RGB scene with between num_plates[0] and num_plates[1] (inclusive) non-overlapping plates.

    Each plate is `plate_width` (a range, as a fraction of the scene's width) wide and `plate_aspect`
    (width over height) in shape, both drawn uniformly, and at least `min_plate` (width, height) pixels.
    Boxes are [x_min, y_min, x_max, y_max] in pixel-edge coordinates (x_max is one past the last
    plate column), the convention the detections table uses. On a small canvas fewer plates than
    asked for may fit; the boxes returned are always the plates actually drawn.
    """
    canvas = Image.fromarray(_background(rng, width, height))
    draw = ImageDraw.Draw(canvas)
    wanted = int(rng.integers(num_plates[0], num_plates[1] + 1))
    boxes: list[list[float]] = []
    for _ in range(wanted * 20):  # rejection sampling; plenty of tries for the sizes used here
        if len(boxes) == wanted:
            break
        plate_w = int(np.clip(rng.uniform(*plate_width) * width, min_plate[0], width - 4))
        plate_h = int(np.clip(plate_w / rng.uniform(*plate_aspect), min_plate[1], height - 4))
        x0 = int(rng.integers(0, width - plate_w + 1))
        y0 = int(rng.integers(0, height - plate_h + 1))
        box = [float(x0), float(y0), float(x0 + plate_w), float(y0 + plate_h)]
        if any(_overlaps(box, other, margin=4) for other in boxes):
            continue
        _draw_plate(draw, rng, box)
        boxes.append(box)
    return np.asarray(canvas, dtype=np.uint8), boxes, [LABEL] * len(boxes)


def write_image_dataset(
    folder: str | Path, num_images: int, seed: int = 0, size: tuple[int, int] = (640, 480), *,
    sizes: list[tuple[int, int]] | None = None, **scene: Any,
) -> Path:
    """JPEG scenes plus their COCO ground truth (`annotations.json`, returned) in `folder`.

    Every scene is `size`, or with `sizes` one of those, drawn at random per scene; `scene` holds
    further options of `make_scene` (plate count, width, shape)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width, height = sizes[int(rng.integers(len(sizes)))] if sizes else size
        pixels, boxes, _ = make_scene(rng, width=width, height=height, **scene)
        file_name = f"scene_{image_id:05d}.jpg"
        Image.fromarray(pixels).save(folder / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for x0, y0, x1, y1 in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": LABEL}]}
    path = folder / "annotations.json"
    path.write_text(json.dumps(coco, indent=1))
    return path


def write_video(
    path: str | Path,
    *,
    num_frames: int = 30,
    fps: int = 10,
    size: tuple[int, int] = (320, 240),
    seed: int = 0,
    faststart: bool = False,
) -> list[list[float]]:
    """An mp4 of one plate sliding left to right over a still scene; returns each frame's box.

    Dimensions are rounded down to even numbers (yuv420p needs them). `faststart` puts the index
    (moov) before the data, as streaming-friendly uploads have it; cutting such a file short then
    fails part way through decoding instead of at open.
    """
    import av

    width, height = size[0] // 2 * 2, size[1] // 2 * 2
    rng = np.random.default_rng(seed)
    background = _background(rng, width, height)
    plate_w, plate_h = max(24, width // 4), max(10, height // 10)
    sprite = Image.new("RGB", (plate_w, plate_h))
    _draw_plate(ImageDraw.Draw(sprite), rng, [0.0, 0.0, float(plate_w), float(plate_h)])
    sprite_pixels = np.asarray(sprite)
    y0 = int(rng.integers(0, height - plate_h + 1))

    boxes = []
    options = {"movflags": "+faststart"} if faststart else {}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream(_video_encoder(), rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(num_frames):
            x0 = round(index * (width - plate_w) / max(num_frames - 1, 1))
            frame = background.copy()
            frame[y0 : y0 + plate_h, x0 : x0 + plate_w] = sprite_pixels
            boxes.append([float(x0), float(y0), float(x0 + plate_w), float(y0 + plate_h)])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return boxes


@dataclass(frozen=True)
class PlatePass:
    """One plate crossing a traffic video: shown from `start_s` (inclusive) to `end_s` (exclusive),
    its top-left corner at `start_xy` then moving at `velocity` pixels per second."""

    start_s: float
    end_s: float
    start_xy: tuple[float, float]
    velocity: tuple[float, float]
    size: tuple[int, int] = (96, 28)

    def box_at(self, t: float) -> list[float]:
        x0 = self.start_xy[0] + self.velocity[0] * (t - self.start_s)
        y0 = self.start_xy[1] + self.velocity[1] * (t - self.start_s)
        return [float(round(x0)), float(round(y0)), float(round(x0) + self.size[0]), float(round(y0) + self.size[1])]


# Four plates, each in its own lane and always whole in the frame, appearing and leaving at known
# times: the first two pass each other in neighbouring lanes in opposite directions, the last two
# run side by side for a while. At 60-100 px/s a 96 px plate moves a third to half its width between
# samples at 2 fps and up to more than its width at 1 fps, as an approaching car does in sampled footage.
TRAFFIC = (
    PlatePass(0.5, 5.5, (20, 40), (100, 0)),
    PlatePass(1.5, 7.0, (520, 110), (-80, 0)),
    PlatePass(3.0, 8.5, (40, 260), (60, 12)),
    PlatePass(4.0, 9.0, (60, 180), (80, 0)),
)


def write_traffic_video(
    path: str | Path, *, passes: tuple[PlatePass, ...] = TRAFFIC, seconds: float = 10.0, fps: int = 10,
    size: tuple[int, int] = (640, 360), seed: int = 0,
) -> list[list[tuple[int, float, list[float]]]]:
    """An mp4 of plates (`passes`) crossing a still scene, each a different plate of text, appearing
    and leaving at known times; returns, per pass, the (frame index, time, box) of every frame it is
    in. Boxes are clipped to the frame (a plate may leave over an edge)."""
    import av

    width, height = size[0] // 2 * 2, size[1] // 2 * 2
    rng = np.random.default_rng(seed)
    background = _background(rng, width, height)
    sprites = []
    for p in passes:
        sprite = Image.new("RGB", p.size)
        _draw_plate(ImageDraw.Draw(sprite), rng, [0.0, 0.0, float(p.size[0]), float(p.size[1])])
        sprites.append(np.asarray(sprite))
    truth: list[list[tuple[int, float, list[float]]]] = [[] for _ in passes]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(_video_encoder(), rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(round(seconds * fps)):
            t = index / fps
            frame = background.copy()
            for i, (p, sprite) in enumerate(zip(passes, sprites)):
                if not p.start_s <= t < p.end_s:
                    continue
                x0, y0, x1, y1 = (int(v) for v in p.box_at(t))
                cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
                if cx0 >= cx1 or cy0 >= cy1:
                    continue
                frame[cy0:cy1, cx0:cx1] = sprite[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
                truth[i].append((index, t, [float(cx0), float(cy0), float(cx1), float(cy1)]))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return truth


def write_long_video(
    path: str | Path,
    *,
    seconds: float,
    size: tuple[int, int] = (1280, 720),
    fps: int = 30,
    chunk_s: float = 10.0,
    gop_s: float = 2.0,
    noise_seed: int | None = None,
) -> None:
    """An mp4 of any length in seconds of encoding: a box sliding over a gradient for `chunk_s`, encoded
    once (a keyframe every `gop_s`, closed GOPs) and its packets muxed again and again with shifted
    timestamps. Decoding it costs what any video of its size and rate costs, which is what long-video
    tests and benchmarks need; ten minutes of 1080p30 are written in seconds instead of many minutes.
    `noise_seed` makes the background random noise instead: a file as large as real footage."""
    from fractions import Fraction

    import av

    width, height = size[0] // 2 * 2, size[1] // 2 * 2
    if noise_seed is None:
        ramp = (np.arange(width, dtype=np.uint16) * 255 // max(width - 1, 1)).astype(np.uint8)
        luma = np.tile(ramp, (height, 1))
    else:
        luma = np.random.default_rng(noise_seed).integers(0, 256, (height, width), dtype=np.uint8)
    planes = np.concatenate([luma, np.full((height // 2, width), 128, np.uint8)])  # yuv420p, grey chroma
    box_w, box_h = max(2, width // 8), max(2, height // 8)
    num_chunk = max(1, round(chunk_s * fps))
    num_total = round(seconds * fps)
    encoder = _video_encoder()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = max(1, round(gop_s * fps))
        if encoder == "libx264":
            stream.codec_context.options = {"preset": "ultrafast", "crf": "30", "sc_threshold": "0"}
        chunk = []
        for index in range(min(num_chunk, num_total) + 1):
            if index < min(num_chunk, num_total):
                x0 = index * (width - box_w) // max(num_chunk - 1, 1)
                planes[:height] = luma
                planes[height // 3 : height // 3 + box_h, x0 : x0 + box_w] = 255
                packets = stream.encode(av.VideoFrame.from_ndarray(planes, format="yuv420p"))
            else:
                packets = stream.encode()  # flush
            chunk += [(bytes(p), p.pts, p.dts, p.is_keyframe, p.duration, p.time_base) for p in packets]
        time_base = chunk[0][5]
        shift = round(Fraction(num_chunk) / Fraction(fps) / time_base)
        written = 0
        repeat = 0
        while written < num_total:
            for data, pts, dts, keyframe, duration, _ in chunk[: num_total - written]:
                packet = av.Packet(data)
                packet.stream, packet.time_base = stream, time_base
                packet.pts, packet.dts = pts + repeat * shift, dts + repeat * shift
                packet.is_keyframe = keyframe
                if duration:
                    packet.duration = duration
                container.mux(packet)
                written += 1
            repeat += 1


def write_bad_inputs(folder: str | Path) -> dict[str, str]:
    """One file per awkward or broken input, as {case: file name in folder}.

    Some cases are not errors but formats a naive decoder gets wrong (alpha, 16-bit, greyscale,
    CMYK, EXIF rotation, palette transparency). `oversized_image` is a real, valid 12000 x 12000
    PNG of ~20 KB: 144 megapixels, above DEFAULT_MAX_PIXELS, so no test has to lower the limit.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    photo = Image.fromarray(make_scene(rng, 160, 120)[0])
    cases: dict[str, str] = {}

    def put(case: str, file_name: str, data: bytes) -> None:
        (folder / file_name).write_bytes(data)
        cases[case] = file_name

    put("empty_file", "empty.jpg", b"")
    jpeg = _encode(photo, "JPEG")
    put("truncated_jpeg", "truncated.jpg", jpeg[: len(jpeg) // 2])
    put("text_as_jpeg", "not_really.jpg", b"This is a text file, not a photo.\n" * 4)
    put("unsupported_extension", "notes.txt", b"inputs with this extension are skipped\n")

    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    put("png_alpha", "alpha.png", _encode(rgba, "PNG"))
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    put("png_palette_transparency", "palette.png", _encode(palette, "PNG", transparency=0))
    # Ramp of 16-bit values whose high byte is the column index: a correct decode gives 0..255.
    # 192 rows so the image has an ordinary shape (a 16 x 256 strip trips detectors' resizing).
    ramp = (np.arange(256, dtype=np.uint16) * 257)[None, :].repeat(192, axis=0)
    put("png_16bit", "grey16.png", _encode(Image.fromarray(ramp), "PNG"))
    put("greyscale_jpeg", "grey.jpg", _encode(photo.convert("L"), "JPEG"))
    put("cmyk_jpeg", "cmyk.jpg", _encode(photo.convert("CMYK"), "JPEG"))

    # Stored 160 x 80 with a red top-left corner; orientation 6 means "rotate 90 degrees clockwise
    # to display", so viewers show 80 x 160 with the red corner at the top right.
    stored = np.full((80, 160, 3), 40, dtype=np.uint8)
    stored[:20, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    put("exif_rotated", "rotated.jpg", _encode(Image.fromarray(stored), "JPEG", exif=exif.tobytes()))

    write_png_bomb(folder / "bomb.png", 12000, 12000)
    cases["oversized_image"] = "bomb.png"

    # An upload cut short before the index (moov is written last by default): unopenable.
    whole = _video_bytes(folder / "_whole.mp4", faststart=False)
    put("corrupt_video", "corrupt.mp4", whole[: min(len(whole) // 2, 2048)])
    # Index first, data cut: opens, yields the first frames, then fails while decoding.
    fast = _video_bytes(folder / "_fast.mp4", faststart=True)
    put("truncated_video", "truncated.mp4", fast[: _middle_of_packet(fast, 14)])
    _write_audio_only(folder / "audio_only.mp4")
    cases["audio_only_video"] = "audio_only.mp4"
    return cases


def write_png_bomb(path: str | Path, width: int, height: int) -> None:
    """A valid 1-bit black PNG of width x height written row by row: kilobytes on disk, gigabytes
    once decoded, and never more than one block of rows in memory here."""
    row = b"\x00" + bytes((width + 7) // 8)  # filter byte "none", then all-zero bits
    compressor = zlib.compressobj(9)
    block = row * 256
    idat = b"".join(compressor.compress(block) for _ in range(height // 256))
    idat += compressor.compress(row * (height % 256)) + compressor.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A gradient, often with noise and distractor shapes, so a detector cannot key on a flat
    backdrop."""
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    t = xs * np.cos(angle) / max(width, 1) + ys * np.sin(angle) / max(height, 1)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-9)
    pixels = start + t[:, :, None] * (end - start)
    if rng.random() < 0.6:
        pixels = pixels + rng.normal(0, rng.uniform(3, 20), (height, width, 1))
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.7:
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(3, 12))):
            xs_ = sorted(rng.integers(0, width, 2).tolist())
            ys_ = sorted(rng.integers(0, height, 2).tolist())
            corners = [xs_[0], ys_[0], xs_[1], ys_[1]]
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = int(rng.integers(0, 3))
            if shape == 0:
                draw.ellipse(corners, fill=colour)
            elif shape == 1:
                draw.rectangle(corners, fill=colour)
            else:
                draw.line(corners, fill=colour, width=int(rng.integers(1, 6)))
    return np.asarray(canvas, dtype=np.uint8)


def _draw_plate(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: list[float]) -> None:
    x0, y0, x1, y1 = (int(v) for v in box)
    fill = (245, 245, 240) if rng.random() < 0.6 else (250, 205, 30)
    border = max(1, min(3, (y1 - y0) // 10))
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill, outline=(20, 20, 25), width=border)
    text = "".join(rng.choice(_CHARS, int(rng.integers(5, 8))))
    font = _font(max(8, int((y1 - y0) * 0.6)))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    if right - left > (x1 - x0) - 2 * border - 2:  # long text on a short plate: size to the width
        font = _font(max(6, int((x1 - x0) / len(text) * 1.1)))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tx = x0 + ((x1 - x0) - (right - left)) // 2 - left
    ty = y0 + ((y1 - y0) - (bottom - top)) // 2 - top
    draw.text((tx, ty), text, fill=(15, 15, 20), font=font)


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _overlaps(a: list[float], b: list[float], margin: float = 0.0) -> bool:
    return not (
        a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]
    )


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _video_bytes(scratch: Path, *, faststart: bool) -> bytes:
    write_video(scratch, num_frames=20, size=(64, 48), faststart=faststart)
    data = scratch.read_bytes()
    scratch.unlink()
    return data


def _middle_of_packet(video: bytes, index: int) -> int:
    """Byte offset halfway into the index-th video packet (in file order): a cut there leaves the
    packets before it whole, where a cut at a fixed fraction could land in the big first keyframe."""
    import av

    with av.open(io.BytesIO(video)) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.pos is not None and p.size]
    pos, size = sorted(packets)[index]
    return pos + size // 2


def _video_encoder() -> str:
    """libx264 where PyAV's FFmpeg has it (the PyPI wheels do); mpeg4 is always built in."""
    import av

    for name in ("libx264", "h264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
        except ValueError:  # UnknownCodecError: not in this FFmpeg build
            continue
        return name
    raise RuntimeError("no H.264 or MPEG-4 encoder in this PyAV build")


def _write_audio_only(path: Path, seconds: float = 1.0, sample_rate: int = 16000) -> None:
    """An mp4 holding one AAC track (a 440 Hz tone) and no video: what a voice memo looks like."""
    import av

    samples = int(seconds * sample_rate)
    tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(samples) / sample_rate)).astype(np.float32)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=sample_rate, layout="mono")
        step = 1024  # AAC's frame size
        for start in range(0, samples, step):
            chunk = np.ascontiguousarray(tone[None, start : start + step])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = sample_rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
