"""Optional speed: kernels, the switches that pick them, probes, CUDA graphs, low-VRAM offload and compilation.
Each changes how the networks run, never what they compute."""
