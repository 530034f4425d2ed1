"""State-space and convolution mixers: Mamba-2 (SSD) and LFM2's gated short convolution."""
