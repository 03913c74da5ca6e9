"""MetaMorph vision encoders: SigLIP, SigLIP 2, CLIP and timm (ViTs and CNNs), registered as
plugins of kind ``encoder``; token reduction and encoder pretraining."""

__version__ = "0.1.0"
