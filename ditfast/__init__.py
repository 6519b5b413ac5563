"""ditfast: a fast, drop-in Diffusion Transformer (DiT) package for PyTorch."""
