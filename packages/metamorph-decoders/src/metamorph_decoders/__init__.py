"""MetaMorph visual decoders (diffusion on visual tokens). Components arrive with issue #4."""

__version__ = "0.1.0"
