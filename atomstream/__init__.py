"""atomstream: live class, latent and defect maps of microscope scans (j-trVAE)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
