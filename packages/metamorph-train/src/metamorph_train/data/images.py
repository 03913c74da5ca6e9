"""Images named by records, read relative to a data root that no path may escape
(:class:`metamorph_core.vision.ImageRoot`, shared with evaluation)."""

from metamorph_core.vision import ImageRoot

__all__ = ["ImageRoot"]
