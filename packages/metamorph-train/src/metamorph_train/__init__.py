"""MetaMorph training: data, feature caches, training objectives (plugins), recipes and the
trainer; registers the ``train`` and ``cache-features`` commands."""

__version__ = "0.1.0"
