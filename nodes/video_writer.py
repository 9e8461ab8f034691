"""X-Portrait Write Video (streaming): the Sampler's latents decoded, pasted back and encoded a chunk at a time."""
from __future__ import annotations

import os
from pathlib import Path

from . import common
from .loader import check_model
from .reference import check_reference

OUTPUT_DIR_ENV = "XPORTRAIT_OUTPUT_DIR"  # outside ComfyUI (tests, scripts): where videos go; default ./output
DEFAULT_FPS = 25.0


def output_directory() -> Path:
    try:
        import folder_paths
    except ImportError:
        return Path(os.environ.get(OUTPUT_DIR_ENV, "output")).resolve()
    return Path(folder_paths.get_output_directory())


def _numbered_path(prefix: str, width: int, height: int) -> tuple[Path, str, str]:
    """(file path, file name, subfolder) for a new video under the output folder, numbered as ComfyUI's own savers
    number theirs (prefix_00001_.mp4, ...)."""
    root = output_directory()
    try:
        import folder_paths
    except ImportError:
        folder_paths = None
    if folder_paths is not None:
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, str(root), width, height)
        folder = Path(folder)
    else:
        subfolder, name = os.path.split(os.path.normpath(prefix))
        folder = (root / subfolder).resolve()
        if os.path.commonpath([str(root), str(folder)]) != str(root):
            raise ValueError(f"the filename_prefix {prefix!r} leads outside the output folder")
        taken = [p.name for p in folder.glob(f"{name}_*_.mp4")] if folder.is_dir() else []
        counter = 1 + max((int(n[len(name) + 1:].split("_")[0]) for n in taken
                           if n[len(name) + 1:].split("_")[0].isdigit()), default=0)
    folder.mkdir(parents=True, exist_ok=True)
    file = f"{name}_{counter:05}_.mp4"
    return folder / file, file, subfolder


class WriteVideo:
    DESCRIPTION = ("Decodes the Sampler's latents a few frames at a time, pastes them back into the reference photo "
                   "and writes them straight into an mp4 with the driving video's sound, so a long video never "
                   "sits in memory as images. Use it instead of the Sampler's frames output for long videos; the "
                   "file appears in ComfyUI's output folder only once complete.")
    CATEGORY = common.CATEGORY
    SEARCH_ALIASES = common.SEARCH_ALIASES
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("The written video's full path.",)
    FUNCTION = "write"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "xportrait_model": (common.MODEL_TYPE, {"tooltip": "The model that sampled the latents (its VAE "
                                                                   "decodes them)."}),
                "latent": ("LATENT", {"tooltip": "The X-Portrait Sampler's latent output."}),
                "filename_prefix": ("STRING", {"default": "xportrait/XPortrait",
                                               "tooltip": "File name prefix inside ComfyUI's output folder; a "
                                                          "number and .mp4 are added."}),
                "fps": ("FLOAT", {"default": DEFAULT_FPS, "min": 0.01, "max": 240.0, "step": 0.01,
                                  "tooltip": "Frame rate, used when no driving video is connected (a connected "
                                             "one gives its own)."}),
                "paste_back": ("BOOLEAN", {"default": True,
                                           "tooltip": "Put each frame back into the full reference photo "
                                                      "(needs the reference); off writes the square frames."}),
                "decode_chunk": ("INT", {"default": 4, "min": 1, "max": 64,
                                         "tooltip": "Frames decoded by the VAE at a time: more needs more GPU "
                                                    "memory; the frames are the same."}),
            },
            "optional": {
                "reference": (common.REFERENCE_TYPE, {"tooltip": "From X-Portrait Load Reference: the photo and "
                                                                 "crop box for paste back."}),
                "driving_video": ("VIDEO", {"tooltip": "The driving video (e.g. from Load Video): its frame rate "
                                                       "and sound are used."}),
                "audio": ("AUDIO", {"tooltip": "Sound to put under the frames when no driving video is "
                                               "connected."}),
            },
        }

    def write(self, xportrait_model, latent, filename_prefix: str = "xportrait/XPortrait", fps: float = DEFAULT_FPS,
              paste_back: bool = True, decode_chunk: int = 4, reference=None, driving_video=None, audio=None):
        node = "X-Portrait Write Video"
        handle = check_model(xportrait_model, node)
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if samples is None or getattr(samples, "ndim", 0) != 4 or samples.shape[0] == 0:
            raise ValueError(f"{node}: 'latent' must be the X-Portrait Sampler's latent output (frames, 4, h, w)")
        if int(decode_chunk) < 1:
            raise ValueError(f"{node}: decode_chunk must be at least 1, got {decode_chunk}")
        photo = None
        if paste_back:
            if reference is None:
                raise ValueError(f"{node}: paste_back needs the reference connected (or turn paste_back off)")
            photo = check_reference(reference, node).primary

        from xportrait_core.faces.paste_back import paste_frame, paste_mask
        from xportrait_core.media.video_io import AudioSamples, probe_video, write_video
        from xportrait_core.sampling.pipeline import iter_frames

        sound = None
        if driving_video is not None:
            if not hasattr(driving_video, "get_stream_source"):
                raise ValueError(f"{node}: 'driving_video' must be a VIDEO (e.g. from Load Video)")
            sound = driving_video.get_stream_source()
            fps = probe_video(sound).fps
        elif audio is not None:
            waveform = audio["waveform"]
            sound = AudioSamples(waveform[0].detach().cpu().float().numpy(), int(audio["sample_rate"]))
        fps = float(fps)
        if not fps > 0:
            raise ValueError(f"{node}: fps must be greater than 0, got {fps}")

        model = handle.ready()
        latents = samples.float().to(model.device) * model.config.vae.scale_factor
        total = latents.shape[0]
        height, width = photo.source_size if photo is not None else [latents.shape[-1] * 8] * 2
        path, file, subfolder = _numbered_path(filename_prefix, width, height)
        mask = paste_mask(photo) if photo is not None else None
        progress = common.Progress(total)

        def frames(should_cancel):
            done = 0
            for chunk in iter_frames(model, latents, int(decode_chunk), should_cancel):
                for frame in chunk:
                    yield paste_frame(frame, photo, mask) if photo is not None else frame
                done += len(chunk)
                progress(done, total)

        common.run_cancellable(lambda should_cancel: write_video(path, frames(should_cancel), fps, audio_from=sound))
        common.soft_empty_cache()
        return {"ui": {"images": [{"filename": file, "subfolder": subfolder, "type": "output"}],
                       "animated": (True,)},
                "result": (str(path),)}


NODE_CLASS_MAPPINGS = {"XPortraitWriteVideo": WriteVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"XPortraitWriteVideo": "X-Portrait Write Video (streaming)"}
