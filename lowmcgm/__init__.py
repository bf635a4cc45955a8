"""lowmcgm: teach Stable Diffusion several subjects from one photo, posed by masks, on a small GPU."""

__version__ = "0.1.0"
