"""ddrl-scale: DDRL post-training of video diffusion transformers (see docs/architecture.md)."""

__version__ = "0.1.0"
