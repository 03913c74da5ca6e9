"""Images named by records, read relative to a data root that no path may escape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metamorph_core.vision import to_tensor


class ImageRoot:
    """Resolves record image paths under ``root``. Absolute paths, ``..`` and symbolic links
    that lead outside the root are rejected."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image root '{root}' is not a directory")

    def resolve(self, relative: str, record_id: Any = None) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(
                f"record {record_id!r}: image path '{relative}' leads outside the data root "
                f"'{self.root}'; paths must stay inside it"
            )
        return path

    def load(self, relative: str, record_id: Any = None) -> Any:
        """``(3, h, w)`` float tensor in [0, 1]; errors name the file and the record."""
        path = self.resolve(relative, record_id)
        if not path.is_file():
            raise FileNotFoundError(
                f"record {record_id!r}: image '{relative}' not found at '{path}'"
            )
        try:
            return to_tensor(path)
        except (ValueError, TypeError) as e:
            raise ValueError(f"record {record_id!r}: {e}") from e
