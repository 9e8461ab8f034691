"""From noise to frames: the samplers over overlapping windows, classifier-free guidance, the starting latents
and the reference + driving video -> frames pipeline."""
