"""Reading driving videos and writing results, through PyAV (its wheels bundle FFmpeg; no system ffmpeg needed)."""
from __future__ import annotations

import contextlib
import itertools
import logging
import numbers
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from .atomic import atomic_output
from .image_formats import to_uint8

logger = logging.getLogger(__name__)

DEFAULT_FPS = 25.0


def _import_av():
    try:
        import av
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("PyAV is missing: `pip install av` (it bundles FFmpeg)") from error
    return av


@dataclass(frozen=True)
class VideoInfo:
    """What a video file's container says about it, without decoding it.

    declared_frames: the frame count the container declares (0 when it declares none); a truncated file may
    decode to fewer. has_audio: it carries a sound stream."""

    path: Path
    fps: float
    declared_frames: int
    width: int
    height: int
    has_audio: bool


def _open_input(path):
    """A path, or an open binary file (ComfyUI's VIDEO may hold its file in memory), as a PyAV input container."""
    av = _import_av()
    if isinstance(path, (str, os.PathLike)):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"video file not found: {path}")
        source = str(path)
    else:
        if hasattr(path, "seek"):
            path.seek(0)
        source = path
    try:
        return av.open(source)
    except av.error.FFmpegError as error:
        raise ValueError(f"could not open {path} as a video: {error}") from error


@dataclass(frozen=True, eq=False)
class AudioSamples:
    """Sound as samples: float (channels, samples) in [-1, 1] at `rate` Hz (what ComfyUI's AUDIO holds), for
    `write_video(audio_from=...)`."""

    samples: np.ndarray
    rate: int


def _frame_rate(stream, path: Path, warn: bool = True) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if rate:
        return float(rate)
    if warn:
        logger.warning("%s does not say its frame rate; assuming %s fps", path, DEFAULT_FPS)
    return DEFAULT_FPS


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Open a video (a path or an open binary file) just enough to read its frame rate, declared frame count, size
    and whether it has sound."""
    path = Path(path) if isinstance(path, (str, os.PathLike)) else path
    with _open_input(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        return VideoInfo(path=path, fps=_frame_rate(stream, path), declared_frames=int(stream.frames or 0),
                         width=int(stream.codec_context.width or 0), height=int(stream.codec_context.height or 0),
                         has_audio=bool(container.streams.audio))


def iter_video(path: str | os.PathLike, max_frames: int | None = None, apply_rotation: bool = True,
               warn_if_short: bool = True) -> Iterator[np.ndarray]:
    """Decode a video file frame by frame: yields uint8 (H, W, 3) RGB frames, holding one at a time.

    max_frames: stop after this many frames. apply_rotation: turn frames upright when the file carries a display
    rotation (phone videos), as players do. warn_if_short: a file that decodes to fewer frames than its container
    declares (a truncated download) is logged as a warning with both counts; its frames before the damage are
    still yielded (the official reader does the same).
    """
    av = _import_av()
    path = Path(path)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    with _open_input(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        declared = int(stream.frames or 0)
        count, damage = 0, None
        try:
            for frame in container.decode(stream):
                image = frame.to_ndarray(format="rgb24")
                quarter_turns = int(round(getattr(frame, "rotation", 0) / 90.0)) % 4 if apply_rotation else 0
                if quarter_turns:
                    image = np.ascontiguousarray(np.rot90(image, quarter_turns))  # counterclockwise, as stored
                count += 1
                yield image
                if max_frames is not None and count >= max_frames:
                    return
        except av.error.FFmpegError as error:
            if not count:
                raise ValueError(f"could not decode {path}: {error}") from error
            damage = error
    if not count:
        raise ValueError(f"{path} contains no decodable video frames")
    wanted = declared if max_frames is None else min(declared, max_frames)
    if warn_if_short and (damage is not None or count < wanted):
        cause = f" ({damage})" if damage is not None else ""
        logger.warning("%s declares %d frames but only %d could be decoded: the file looks truncated or damaged%s; "
                       "the animation uses the %d frames that decode", path, declared, count, cause, count)


def _count_packets(path) -> int:
    """The video packets in a file, counted without decoding: its frames, unless some fail to decode."""
    av = _import_av()
    with _open_input(path) as container:
        stream = container.streams.video[0]
        count = 0
        try:
            for packet in container.demux(stream):
                count += 1 if packet.size else 0
        except av.error.FFmpegError:
            pass  # a damaged file: the packets before the damage
        return count


class VideoFrames:
    """A video file's frames as a sequence that decodes the file as they are asked for, for passes over a long
    video that never hold it whole: `frames[i]` in increasing order decodes on (the current frame can be asked
    again), an earlier index decodes from the start again. Iterating decodes from the start.

    len(): the frames that decode, capped at max_frames. A file that decodes to fewer frames than its container
    declares (a truncated download) is logged as a warning with both counts when this is made, once.
    """

    def __init__(self, path: str | os.PathLike, max_frames: int | None = None, apply_rotation: bool = True):
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
        self.info = probe_video(path)
        self.path, self.max_frames, self.apply_rotation = Path(path), max_frames, apply_rotation
        declared = self.info.declared_frames
        count = _count_packets(self.path)
        if count < declared or not count:
            # Fewer packets than declared (or none counted): decode once to know how many frames really decode.
            count = sum(1 for _ in iter_video(self.path, max_frames, apply_rotation, warn_if_short=False))
            if declared and count < declared and (max_frames is None or count < max_frames):
                logger.warning("%s declares %d frames but only %d could be decoded: the file looks truncated or "
                               "damaged; the animation uses the %d frames that decode", self.path, declared, count,
                               count)
        self._len = count if max_frames is None else min(count, max_frames)
        self._decoder = None
        self._next = 0  # the index the decoder yields next
        self._current = None

    @property
    def fps(self) -> float:
        return self.info.fps

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"frame {index} of a {self._len}-frame video")
        if index == self._next - 1 and self._current is not None:
            return self._current
        if self._decoder is None or index < self._next:
            self.close()
            self._decoder = iter_video(self.path, None, self.apply_rotation, warn_if_short=False)
        while self._next <= index:
            frame = next(self._decoder, None)
            if frame is None:
                # Fewer frames decoded this time than counted (a packet that fails to decode): repeat the last.
                logger.warning("%s: frame %d does not decode; the previous frame stands in", self.path, self._next)
                frame = self._current
            self._current, self._next = frame, self._next + 1
        return self._current

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(self._len):
            yield self[index]

    def close(self) -> None:
        """Close the file the decoder holds open (it reopens when frames are asked for again)."""
        if self._decoder is not None:
            self._decoder.close()
        self._decoder, self._next, self._current = None, 0, None


def read_video(
    path: str | os.PathLike, max_frames: int | None = None, apply_rotation: bool = True
) -> tuple[np.ndarray, float]:
    """Decode a video file -> (uint8 (N, H, W, 3) RGB frames, frames per second), all in memory.

    max_frames / apply_rotation as `iter_video`; long videos are better read with `iter_video` or `VideoFrames`.
    """
    path = Path(path)
    fps = probe_video(path).fps
    frames = list(iter_video(path, max_frames, apply_rotation))
    return np.stack(frames), fps


def write_video(
    path: str | os.PathLike, frames, fps: float, crf: int = 18, codec: str = "libx264",
    audio_from: str | os.PathLike | None = None,
) -> Path:
    """Encode frames to an H.264 mp4 (yuv420p, playable everywhere). Returns the path.

    frames: (N, H, W, 3) or (N, H, W) array, or any iterable of images (a generator too: frames are encoded as they
    come, so a long video never has to sit in memory whole), uint8 or float in [0, 1]. yuv420p needs even sizes:
    an odd width or height is padded by repeating the last column/row. crf: quality (0 lossless .. 51).
    audio_from: a video (or audio) file, or an open binary one, whose first audio stream is added, from its
        start, for as long as the frames last, as AAC: the driving video's sound under an animation made frame by
        frame from it. A file without sound adds none. Or `AudioSamples`. The sound is encoded along with the
        frames, so it too streams.
    The file is written under a temporary name beside `path` and renamed to it once complete: an error or an
    interruption (Ctrl-C) leaves any previous file at `path` as it was and no partial file (media/atomic.py).
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
    with atomic_output(path) as partial:
        try:
            container = av.open(str(partial), mode="w")
        except av.error.FFmpegError as error:
            raise ValueError(f"could not create {path}: {error}") from error
        with contextlib.ExitStack() as open_files:
            open_files.enter_context(container)
            stream = container.add_stream(codec, rate=rate)
            soundtrack = None if audio_from is None else open_files.enter_context(_Soundtrack(container, audio_from))
            stream.width, stream.height = even_w, even_h
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(int(crf))}
            written = 0
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
                written = index + 1
                if soundtrack is not None:
                    soundtrack.write_until(written / float(rate))
            for packet in stream.encode():
                container.mux(packet)
            if soundtrack is not None:
                soundtrack.write_until(written / float(rate), final=True)
    return path


class _Soundtrack:
    """The first audio stream of `source`, re-encoded as AAC into `container` (mp4 takes AAC from any source
    codec). The stream is added when made, since a container takes no new stream once it has written packets;
    `write_until(seconds)` then adds the sound from where it stopped up to that time from the source's start,
    and `final=True` adds the last short frame and flushes the encoder. A context manager: the source closes on
    leaving."""

    def __init__(self, container, source):
        av = _import_av()
        self.container, self.stream, self.source, self.samples = container, None, None, None
        self.taken = 0  # samples encoded so far
        self._decoded = None  # the source's decoded frames, opened on first use
        self._resampler = self._fifo = None
        if isinstance(source, AudioSamples):
            samples = np.asarray(source.samples, np.float32)
            samples = samples[None] if samples.ndim == 1 else samples
            if samples.ndim != 2 or samples.shape[1] == 0:
                return
            self.layout = "stereo" if samples.shape[0] > 1 else "mono"
            self.samples = np.ascontiguousarray(samples[:2] if samples.shape[0] > 1 else samples)
            self.rate = int(source.rate)
        else:
            try:
                self.source = _open_input(source) if not isinstance(source, (str, os.PathLike)) \
                    else av.open(str(source))
            except av.error.FFmpegError as error:
                raise ValueError(f"could not read the sound of {source}: {error}") from error
            if not self.source.streams.audio:
                return
            self.input = self.source.streams.audio[0]
            self.rate = self.input.codec_context.sample_rate or 44100
            self.layout = "stereo" if (self.input.codec_context.channels or 1) > 1 else "mono"
        self.stream = container.add_stream("aac", rate=self.rate, layout=self.layout)

    def _sample_frames(self):
        av = _import_av()
        for start in range(0, self.samples.shape[1], 4096):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(self.samples[:, start:start + 4096]),
                                               format="fltp", layout=self.layout)
            frame.sample_rate = self.rate
            yield frame

    def _fill(self, samples: int) -> None:
        """Decode until the fifo holds `samples` samples or the source's sound ends (or breaks off)."""
        av = _import_av()
        while self._fifo.samples < samples and self._decoded is not None:
            try:
                frame = next(self._decoded, None)
            except av.error.FFmpegError as error:  # a damaged sound track: keep what decoded
                logger.warning("the sound of %s breaks off: %s", getattr(self.source, "name", "the source"), error)
                frame = None
            if frame is None:
                self._decoded = None
                return
            for resampled in self._resampler.resample(frame):
                resampled.pts = None
                self._fifo.write(resampled)

    def write_until(self, seconds: float, final: bool = False) -> None:
        if self.stream is None:
            return
        av = _import_av()
        if self._fifo is None:
            self._resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.rate)
            self._fifo = av.AudioFifo()
            self._decoded = self._sample_frames() if self.samples is not None else iter(self.source.decode(self.input))
        wanted = int(round(seconds * self.rate))
        # AAC takes frames of exactly frame_size samples (known once the encoder has opened, 1024 for AAC); only
        # the last may be short.
        chunk = self.stream.frame_size or 1024
        while wanted - self.taken >= chunk:
            self._fill(chunk)
            if self._fifo.samples < chunk:
                break
            self.taken = self._encode(self._fifo.read(chunk), self.taken)
        if final:
            left = wanted - self.taken
            if 0 < left < chunk:
                self._fill(left)
            if left > 0 and self._fifo.samples:  # the source's sound may end first: the last samples left
                self.taken = self._encode(self._fifo.read(min(self._fifo.samples, left)), self.taken)
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
        if self.source is not None:
            self.source.close()
