"""X-Portrait in pure PyTorch: the network, official checkpoint loading, sampling, faces and identity metrics.

Nothing in this package imports ComfyUI. Importing the package itself is cheap; the torch-heavy modules are
imported where they are used.

Modules, one idea each:
  config            frozen dataclasses, `XPortraitConfig.official()` / `.tiny()`
  attention         the one attention dispatch (xformers / SDPA / math)
  blocks            ResBlock, Down/Upsample, spatial transformer with reference-bank write/read
  reference_attention  the reference bank the appearance net writes and the UNet reads
  temporal          AnimateDiff-style temporal transformer (motion module)
  unet              the UNet layout shared by the main UNet, the reference net and the ControlNets
  motion_control    global/local ControlNets (hierarchical motion control)
  vae               the KL autoencoder
  text_encoder      CLIP ViT-L/14 text transformer for the empty prompt
  schedule          DDPM noise schedule
  model             `XPortrait`: the whole network and its conditional / unconditional predictions
  checkpoint        official key mapping, loading, conversion to safetensors
  sampler           DDIM with guidance over overlapping windows
  pipeline          reference + driving video -> frames
  landmarks, face_alignment, reference_crop, paste_back, identity, video_io   faces and media
"""

__version__ = "0.1.0"
