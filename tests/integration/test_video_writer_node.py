"""X-Portrait Write Video (streaming): the Sampler's latents decoded, pasted back and written chunk by chunk give the
same video as the Sampler's frames through Paste Back, with the driving video's frame rate and sound; an
interruption leaves no file."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from pack_loader import load_pack, node_classes, run_node, run_node_ui

RESOLUTION = 64
NUM_FRAMES = 5


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, golden_state_dict_path):
    folder = tmp_path_factory.mktemp("models_xportrait")
    os.symlink(golden_state_dict_path, folder / "tiny.safetensors")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XPORTRAIT_MODELS_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def sampled(models_dir, source_image_path, driving_video_path):
    """(model, reference, the Sampler's frames and latent) for a few frames of the sample, one step."""
    from PIL import Image

    from xportrait_core.media.video_io import read_video

    tiny = run_node("XPortraitLoadModel", model_name="tiny.safetensors", dtype="fp32", attention="auto")[0]
    canvas = np.full((600, 700, 3), 128, np.uint8)  # the portrait in a larger photo: paste back has work to do
    canvas[40:552, 100:612] = np.asarray(Image.open(source_image_path).convert("RGB"))
    photo = torch.from_numpy(canvas.astype(np.float32) / 255)[None]
    reference = run_node("XPortraitLoadReference", image=photo, crop_margin=0.5, resolution=RESOLUTION,
                         mode="crop")[0]
    frames = torch.from_numpy(read_video(driving_video_path, max_frames=NUM_FRAMES)[0].astype(np.float32) / 255)
    motion = run_node("XPortraitExtractMotion", reference=reference, driving_frames=frames, best_frame=-1,
                      track_missed_faces=True)[0]
    zero = [[torch.zeros(1, 77, 32), {"pooled_output": None}]]
    images, latent = run_node("XPortraitSampler", xportrait_model=tiny, reference=reference, motion=motion, seed=3,
                              steps=1, guidance=5.0, window_overlap=4, initial_latents="noised reference",
                              positive=zero, negative=zero)
    return tiny, reference, images, latent


@pytest.fixture
def output_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XPORTRAIT_OUTPUT_DIR", str(tmp_path))
    return tmp_path


class FileVideo:
    """Stands in for ComfyUI's VIDEO (VideoFromFile): the file it was loaded from."""

    def __init__(self, path):
        self.path = str(path)

    def get_stream_source(self):
        return self.path


def test_the_streamed_video_is_the_samplers_frames_pasted_back(sampled, output_dir):
    from xportrait_core.media.video_io import read_video, write_video

    tiny, reference, images, latent = sampled
    result, ui = run_node_ui("XPortraitWriteVideo", xportrait_model=tiny, latent=latent, filename_prefix="clips/xp",
                             fps=10.0, paste_back=True, decode_chunk=2, reference=reference)
    path = output_dir / "clips" / "xp_00001_.mp4"
    assert result == (str(path),)
    assert ui == {"images": [{"filename": "xp_00001_.mp4", "subfolder": "clips", "type": "output"}],
                            "animated": (True,)}
    pasted = run_node("XPortraitPasteBack", frames=images, reference=reference, feather=-1)[0]
    expected = write_video(output_dir / "expected.mp4", pasted.numpy(), fps=10.0)
    streamed, fps = read_video(path)
    assert streamed.shape == (NUM_FRAMES, 600, 700, 3) and fps == pytest.approx(10.0)
    np.testing.assert_array_equal(streamed, read_video(expected)[0])  # the same encoder input, frame for frame
    # A second video is numbered after the first; square frames without paste back.
    again = run_node("XPortraitWriteVideo", xportrait_model=tiny, latent=latent, filename_prefix="clips/xp",
                     fps=10.0, paste_back=False, decode_chunk=4)
    assert again == (str(output_dir / "clips" / "xp_00002_.mp4"),)
    assert read_video(again[0])[0].shape == (NUM_FRAMES, RESOLUTION, RESOLUTION, 3)


def test_frame_rate_and_sound_come_from_the_driving_video_or_the_audio_input(sampled, output_dir, driving_video_path):
    from media import sound_of, video_with_sound

    from xportrait_core.media.video_io import read_video

    tiny, reference, _images, latent = sampled
    talking = output_dir / "talking.mp4"
    video_with_sound(driving_video_path, talking, frames=12)  # 1 s at the sample's 12 fps
    result = run_node("XPortraitWriteVideo", xportrait_model=tiny, latent=latent, filename_prefix="a", fps=25.0,
                      paste_back=False, decode_chunk=4, driving_video=FileVideo(talking))
    samples, rate = sound_of(result[0])
    assert read_video(result[0])[1] == pytest.approx(12000 / 1001)
    assert abs(len(samples) / rate - NUM_FRAMES * 1001 / 12000) < 0.03  # as long as the frames last
    tone = 0.5 * np.sin(2 * np.pi * 220 * np.arange(48000) / 48000)
    audio = {"waveform": torch.from_numpy(tone).float()[None, None], "sample_rate": 48000}
    result = run_node("XPortraitWriteVideo", xportrait_model=tiny, latent=latent, filename_prefix="b", fps=5.0,
                      paste_back=False, decode_chunk=4, audio=audio)
    samples, rate = sound_of(result[0])
    assert abs(len(samples) / rate - NUM_FRAMES / 5.0) < 0.03


def test_an_interruption_leaves_no_file_and_paste_back_needs_the_reference(sampled, output_dir):
    common = load_pack().nodes.common
    tiny, _reference, _images, latent = sampled
    common.request_interrupt(True)
    try:
        with pytest.raises(Exception) as info:
            run_node("XPortraitWriteVideo", xportrait_model=tiny, latent=latent, filename_prefix="c", fps=10.0,
                     paste_back=False, decode_chunk=1)
    finally:
        common.request_interrupt(False)
    assert "interrupted" in str(info.value)
    assert [p for p in output_dir.rglob("*") if p.is_file()] == []
    with pytest.raises(ValueError, match="paste_back needs the reference"):
        run_node("XPortraitWriteVideo", xportrait_model=tiny, latent=latent, filename_prefix="c", fps=10.0,
                 paste_back=True, decode_chunk=1)
