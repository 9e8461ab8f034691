"""Media files the tests make: a driving video with sound."""
from __future__ import annotations

import fractions
from pathlib import Path

import av
import numpy as np


def video_with_sound(source: Path, target: Path, frames: int, tone_hz: float = 440.0) -> float:
    """The first `frames` frames of `source` with a sine tone as long as they last (AAC): a driving video with a
    voice. Returns its duration in seconds."""
    with av.open(str(source)) as src:
        stream = src.streams.video[0]
        rate = stream.average_rate or fractions.Fraction(12)
        images = [f.to_ndarray(format="rgb24") for _, f in zip(range(frames), src.decode(stream))]
    sample_rate, duration = 44100, frames / float(rate)
    with av.open(str(target), "w") as out:
        video = out.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = images[0].shape[1], images[0].shape[0], "yuv420p"
        audio = out.add_stream("aac", rate=sample_rate, layout="mono")
        for image in images:
            out.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(video.encode())
        t = np.arange(int(sample_rate * duration)) / sample_rate
        tone = (0.3 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
        for start in range(0, len(tone), 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, start:start + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = sample_rate, start
            out.mux(audio.encode(frame))
        out.mux(audio.encode())
    return duration


def sound_of(path: Path) -> tuple[np.ndarray, int] | None:
    """(mono float samples, sample rate) of a file's first audio stream, or None when it has none."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        # Planar or packed, the channels averaged: frames of (channels, samples) or (1, samples x channels).
        channels = stream.codec_context.channels or 1
        samples = np.concatenate([f.to_ndarray().reshape(-1, channels).mean(axis=1) if not f.format.is_planar
                                  else f.to_ndarray().mean(axis=0) for f in container.decode(stream)])
        return samples, stream.codec_context.sample_rate
