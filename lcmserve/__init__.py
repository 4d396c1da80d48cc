"""lcmserve: distil, run and serve Latent Consistency Models (Luo et al., 2023)."""

__version__ = "0.1.0"
