"""The network: configs, layers, the four UNet-shaped networks, the VAE, the text encoder, the noise schedule and
the official checkpoint's key map. Pure PyTorch; no kernel module is imported here (fast paths arrive as layer
classes through an operations namespace)."""
