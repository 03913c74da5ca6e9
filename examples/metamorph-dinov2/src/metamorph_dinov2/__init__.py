"""DINOv2 as a MetaMorph vision encoder: an example of a third-party plugin package."""

__version__ = "0.1.0"
