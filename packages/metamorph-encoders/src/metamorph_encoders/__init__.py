"""MetaMorph vision encoders (SigLIP, CLIP, timm ViTs and CNNs). Components arrive with issue #3."""

__version__ = "0.1.0"
