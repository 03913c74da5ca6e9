"""Components of metamorph's own optional packages, by kind and name: when one is not
registered, the error names the package to install (``pip install metamorph-decoders``)
instead of only calling the name unknown. Kinds listed here are listed completely (a test
compares them with what the installed packages register); components that only the package
providing them uses (training objectives, loggers, tasks) need no entry.
"""

from __future__ import annotations

#: (kind, name) -> the distribution that registers it
PROVIDED_BY: dict[tuple[str, str], str] = {
    ("encoder", "siglip"): "metamorph-encoders",
    ("encoder", "siglip2"): "metamorph-encoders",
    ("encoder", "clip"): "metamorph-encoders",
    ("encoder", "timm"): "metamorph-encoders",
    ("encoder", "open_clip"): "metamorph-encoders",
    ("decoder", "sd-unet"): "metamorph-decoders",
    ("adapter", "mlp"): "metamorph-decoders",
    ("adapter", "query"): "metamorph-decoders",
}
