"""X-Portrait in pure PyTorch: the network, official checkpoint loading, sampling, faces and identity metrics.

Nothing in this package imports ComfyUI. Importing the package itself is cheap; the torch-heavy modules are
imported where they are used.

Folders, one concept each:
  model/      the network: config, blocks, attention, reference bank, temporal, UNet, motion control, VAE,
              text encoder, schedule, checkpoint key map, `XPortrait`
  sampling/   samplers over overlapping windows, guidance, initial latents, the pipeline
  faces/      landmarks, reference crop, motion hints, regions, paste-back, identity
  media/      video and image I/O
  fast/       optional kernels, switches, probes, CUDA graphs, offload, compilation
  cli.py      the command line (`python -m xportrait_core`)
"""

__version__ = "0.1.0"
