"""MetaMorph training and the ``metamorph`` command line."""

__version__ = "0.1.0"
