"""The demo's picture: what a run computed, on one PNG beside its video.

The demo runs the real pipeline with tiny random test weights, so its video is noise; what it does show is that
every stage before and after the networks works on real inputs. The strip lays them out: the reference as the
model sees it, a few driving frames with the global hints (each frame aligned onto the reference's face) and local
hints (eye and mouth patches) built from them, the output frames at the same indices, and the identity check's
plot (the distance of each output face to the reference's; in noise no face is found, and the plot marks each
frame as missing).
"""
from __future__ import annotations

import logging

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TILE = 128  # pixels per picture in the strip (the demo works at 64x64: shown twice as large, unblurred)
GAP = 6
CAPTION = 16
BACKGROUND = (255, 255, 255)


def pick_frames(num_frames: int, count: int = 4) -> list[int]:
    """`count` frame indices spread evenly from the first to the last (fewer when the video is shorter)."""
    if num_frames < 1:
        raise ValueError("no frames to show")
    count = min(count, num_frames)
    return sorted({round(i * (num_frames - 1) / max(count - 1, 1)) for i in range(count)})


def _tile(image: np.ndarray) -> Image.Image:
    """A (H, W, 3) image, float [0, 1] or [-1, 1] (hints, `signed`) already mapped to [0, 1], or uint8, as a tile."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    picture = Image.fromarray(np.ascontiguousarray(array[..., :3]))
    resample = Image.NEAREST if picture.width <= TILE else Image.LANCZOS
    return picture.resize((TILE, TILE), resample)


def hint_images(hints: np.ndarray) -> np.ndarray:
    """Motion hints float32 (N, 3, R, R) in [-1, 1] as (N, R, R, 3) images in [0, 1]."""
    return (np.transpose(np.asarray(hints, np.float32), (0, 2, 3, 1)) + 1.0) / 2.0


def result_strip(reference: np.ndarray, rows: list[tuple[str, list[np.ndarray]]], reference_caption: str,
                 plot: np.ndarray | None = None, plot_caption: str = "") -> np.ndarray:
    """uint8 (H, W, 3): the reference on the left of the first row, each row's captioned tiles, the plot below."""
    columns = 1 + max(len(tiles) for _, tiles in rows)
    width = columns * TILE + (columns + 1) * GAP
    row_height = CAPTION + TILE + GAP
    plot_image = None
    if plot is not None:
        plot_image = Image.fromarray(np.asarray(plot, np.uint8))
        plot_image = plot_image.resize((width - 2 * GAP, round(plot_image.height * (width - 2 * GAP) / plot_image.width)),
                                       Image.LANCZOS)
    height = GAP + len(rows) * row_height + (CAPTION + plot_image.height + GAP if plot_image is not None else 0)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((GAP, GAP), reference_caption, fill=(0, 0, 0), font=font)
    canvas.paste(_tile(reference), (GAP, GAP + CAPTION))
    for index, (caption, tiles) in enumerate(rows):
        top = GAP + index * row_height
        draw.text((GAP + TILE + GAP, top), caption, fill=(0, 0, 0), font=font)
        for column, image in enumerate(tiles, start=1):
            canvas.paste(_tile(image), (GAP + column * (TILE + GAP), top + CAPTION))
    if plot_image is not None:
        top = GAP + len(rows) * row_height
        draw.text((GAP, top), plot_caption, fill=(0, 0, 0), font=font)
        canvas.paste(plot_image, (GAP, top + CAPTION))
    return np.asarray(canvas, np.uint8).copy()


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write the image under a temporary name beside `path`, then rename it into place."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent or ".")
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's private mode, made an ordinary file's
        Image.fromarray(image).save(temporary, format="PNG", optimize=True)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def strip_path(video_path: str | os.PathLike) -> Path:
    """Where the strip of a video goes: beside it, `<name>_strip.png`."""
    video_path = Path(video_path)
    return video_path.with_name(video_path.stem + "_strip.png")


def demo_strip(reference_path: str, driving_path: str, video_path: str, resolution: int, max_frames: int | None,
               best_frame: int = -1) -> np.ndarray:
    """The strip of a finished demo run: the reference and the motion hints computed again from the same files
    (the same code as the run: a few seconds at the demo's size), the output frames read back from its video, and
    the identity check of those frames against the reference photo."""
    from .faces.identity import measure_identity, plot_identity
    from .faces.motion_hints import extract_motion
    from .faces.reference_crop import prepare_reference
    from .media.video_io import VideoFrames, iter_video

    with Image.open(reference_path) as opened:
        source = np.asarray(opened.convert("RGB"))
    reference = prepare_reference(source, resolution, mode="resize", where=f"the reference image {reference_path}")
    # The run already reported the inputs' problems (a short video, frames without a face): computed again here
    # quietly, and streamed like the run, so the strip adds no memory that grows with the video's length.
    logging.disable(logging.WARNING)
    try:
        driving = VideoFrames(driving_path, max_frames)
        motion = extract_motion(driving, reference.image, resolution, best_frame=best_frame, hint_dtype=np.float16)
    finally:
        logging.disable(logging.NOTSET)
    output = np.stack(list(iter_video(video_path)))  # frames at the model's resolution
    count = min(len(output), len(driving))
    output = output[:count]
    shown = pick_frames(count)
    report = measure_identity(source, output)  # (against the driving frames too would cost a face descriptor each)
    global_hints, local_hints = hint_images(motion.global_hint), hint_images(motion.local_hint)
    rows = [
        ("driving frames " + ", ".join(str(i) for i in shown), [driving[i] for i in shown]),  # in order
        ("global hints: driving frames aligned onto the reference's face"
         + ("" if motion.best_frame is None else f" (best frame {motion.best_frame})"), [global_hints[i] for i in shown]),
        ("local hints: eye and mouth patches", [local_hints[i] for i in shown]),
        (f"output frames ({len(output)} at {output.shape[2]}x{output.shape[1]})", [output[i] for i in shown]),
    ]
    missing = len(report.missing_frames)
    caption = (f"identity check: distance of each output face to the reference's; no face in {missing} of "
               f"{report.num_frames} output frames (grey crosses)")
    return result_strip(reference.image, rows, f"reference ({resolution}x{resolution})",
                        plot_identity(report, width=720, height=200), caption)
