"""Reading driving videos and writing results, through PyAV (its wheels bundle FFmpeg; no system ffmpeg needed)."""
from __future__ import annotations

import contextlib
import itertools
import logging
import numbers
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from .image_formats import to_uint8

logger = logging.getLogger(__name__)

DEFAULT_FPS = 25.0


def _import_av():
    try:
        import av
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("PyAV is missing: `pip install av` (it bundles FFmpeg)") from error
    return av


def read_video(
    path: str | os.PathLike, max_frames: int | None = None, apply_rotation: bool = True
) -> tuple[np.ndarray, float]:
    """Decode a video file -> (uint8 (N, H, W, 3) RGB frames, frames per second).

    max_frames: stop after this many frames. apply_rotation: turn frames upright when the file carries a display
    rotation (phone videos), as players do.
    """
    av = _import_av()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as error:
        raise ValueError(f"could not open {path} as a video: {error}") from error
    frames: list[np.ndarray] = []
    with container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if rate:
            fps = float(rate)
        else:
            fps = DEFAULT_FPS
            logger.warning("%s does not say its frame rate; assuming %s fps", path, DEFAULT_FPS)
        try:
            for frame in container.decode(stream):
                image = frame.to_ndarray(format="rgb24")
                quarter_turns = int(round(getattr(frame, "rotation", 0) / 90.0)) % 4 if apply_rotation else 0
                if quarter_turns:
                    image = np.ascontiguousarray(np.rot90(image, quarter_turns))  # counterclockwise, as stored
                frames.append(image)
                if max_frames is not None and len(frames) >= max_frames:
                    break
        except av.error.FFmpegError as error:
            if not frames:
                raise ValueError(f"could not decode {path}: {error}") from error
            # a truncated file still gives the frames before the damage (the official reader does the same)
            logger.warning("%s: decoding stopped after %d frames: %s", path, len(frames), error)
    if not frames:
        raise ValueError(f"{path} contains no decodable video frames")
    return np.stack(frames), fps


def write_video(
    path: str | os.PathLike, frames, fps: float, crf: int = 18, codec: str = "libx264",
    audio_from: str | os.PathLike | None = None,
) -> Path:
    """Encode frames to an H.264 mp4 (yuv420p, playable everywhere). Returns the path.

    frames: (N, H, W, 3) or (N, H, W) array, or any iterable of images (a generator too: frames are encoded as they
    come, so a long video never has to sit in memory whole), uint8 or float in [0, 1]. yuv420p needs even sizes:
    an odd width or height is padded by repeating the last column/row. crf: quality (0 lossless .. 51).
    audio_from: a video (or audio) file whose first audio stream is added, from its start, for as long as the
        frames last, as AAC: the driving video's sound under an animation made frame by frame from it. A file
        without sound adds none.
    """
    av = _import_av()
    path = Path(path)
    if isinstance(fps, bool) or not (isinstance(fps, numbers.Real) and np.isfinite(float(fps)) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    remaining = iter(frames)
    first = next(remaining, None)
    if first is None:
        raise ValueError("no frames to write (empty batch)")
    first = np.asarray(first)
    if first.ndim not in (2, 3) or (first.ndim == 3 and first.shape[2] not in (1, 3)):
        raise ValueError(f"frames must be (H, W, 3) or (H, W) images, got a frame of shape {first.shape}")
    height, width = first.shape[:2]
    even_h, even_w = height + height % 2, width + width % 2
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = fps if isinstance(fps, Fraction) else Fraction(float(fps)).limit_denominator(1001)
    try:
        container = av.open(str(path), mode="w")
    except av.error.FFmpegError as error:
        raise ValueError(f"could not create {path}: {error}") from error
    with contextlib.ExitStack() as open_files:
        open_files.enter_context(container)
        stream = container.add_stream(codec, rate=rate)
        soundtrack = None if audio_from is None else open_files.enter_context(_Soundtrack(container, audio_from))
        stream.width, stream.height = even_w, even_h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(int(crf))}
        for index, frame in enumerate(itertools.chain([first], remaining)):
            image = np.asarray(frame)
            if image.shape[:2] != (height, width):
                raise ValueError(f"frame {index} is {image.shape[:2]}, the first frame is {(height, width)}")
            if image.dtype != np.uint8:
                image = to_uint8(np.clip(image, 0.0, 1.0))
            if image.ndim == 2 or image.shape[2] == 1:
                image = np.repeat(image.reshape(height, width, 1), 3, axis=2)
            if (even_h, even_w) != (height, width):
                image = np.pad(image, ((0, even_h - height), (0, even_w - width), (0, 0)), mode="edge")
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if soundtrack is not None:
            soundtrack.write(seconds=(index + 1) / float(rate))
    return path


class _Soundtrack:
    """The first audio stream of `source`, re-encoded as AAC into `container` (mp4 takes AAC from any source
    codec). The stream is added when made, since a container takes no new stream once it has written packets;
    `write(seconds)` then adds that much sound from the source's start. A context manager: the source closes on
    leaving."""

    def __init__(self, container, source: str | os.PathLike):
        av = _import_av()
        self.container, self.stream = container, None
        try:
            self.source = av.open(str(source))
        except av.error.FFmpegError as error:
            raise ValueError(f"could not read the sound of {source}: {error}") from error
        if not self.source.streams.audio:
            return
        self.input = self.source.streams.audio[0]
        self.rate = self.input.codec_context.sample_rate or 44100
        self.layout = "stereo" if (self.input.codec_context.channels or 1) > 1 else "mono"
        self.stream = container.add_stream("aac", rate=self.rate, layout=self.layout)

    def write(self, seconds: float) -> None:
        if self.stream is None:
            return
        av = _import_av()
        resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.rate)
        fifo = av.AudioFifo()
        wanted, taken = int(round(seconds * self.rate)), 0
        for frame in self.source.decode(self.input):
            for resampled in resampler.resample(frame):
                resampled.pts = None
                fifo.write(resampled)
            # AAC takes frames of exactly frame_size samples (known once the encoder has opened, 1024 for AAC);
            # only the last may be short.
            chunk = self.stream.frame_size or 1024
            while taken < wanted and fifo.samples >= chunk:
                taken = self._encode(fifo.read(min(chunk, wanted - taken)), taken)
            if taken >= wanted:
                break
        if taken < wanted and fifo.samples:  # the source's sound ends first: the last samples left
            self._encode(fifo.read(min(fifo.samples, wanted - taken)), taken)
        for packet in self.stream.encode():
            self.container.mux(packet)

    def _encode(self, frame, taken: int) -> int:
        # Timestamps count samples from 0: the sound starts with the first frame.
        frame.pts, frame.time_base = taken, Fraction(1, self.rate)
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        return taken + frame.samples

    def __enter__(self) -> "_Soundtrack":
        return self

    def __exit__(self, *exc) -> None:
        self.source.close()
