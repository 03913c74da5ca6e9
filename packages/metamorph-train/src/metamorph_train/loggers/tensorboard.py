"""``tensorboard``: event files for TensorBoard (``pip install 'metamorph-train[tensorboard]'``).

Scalars are tagged ``NAMESPACE/KEY`` (``train/text_loss``, ``eval/held/visual_loss``), text
and images under the names validation gives them; the resolved recipe and the run information
are logged as text at the start step. Files go to ``log_dir`` (default
``output_dir/tensorboard``). Resume: the writer purges events from step N + 1 on (N the step
resumed from), so TensorBoard shows each step once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from metamorph_train.loggers import Logger, require


class TensorBoardLogger(Logger):
    """TensorBoard event files through ``torch.utils.tensorboard.SummaryWriter``."""

    name = "tensorboard"

    def __init__(self, log_dir: str | None = None, flush_secs: int = 30) -> None:
        """``log_dir``: where the event files go (relative paths: to the run directory);
        default ``output_dir/tensorboard``."""
        require("tensorboard", self.name, "tensorboard")
        self.log_dir, self.flush_secs = log_dir, flush_secs
        self.writer: Any = None

    def start(self, run_dir: Path, config: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        where = Path(self.log_dir) if self.log_dir else Path("tensorboard")
        where = where if where.is_absolute() else Path(run_dir) / where
        step = int(meta.get("start_step", 0))
        self.writer = SummaryWriter(str(where), purge_step=step + 1, flush_secs=self.flush_secs)
        self.writer.add_text("recipe", _code(yaml.safe_dump(dict(config), sort_keys=False)), step)
        self.writer.add_text("run_info", _code(json.dumps(dict(meta), indent=2)), step)

    def log_metrics(
        self, step: int, metrics: Mapping[str, float], namespace: str = "train"
    ) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"{namespace}/{key}", float(value), step)

    def log_text(self, step: int, name: str, text: str) -> None:
        self.writer.add_text(name, text, step)

    def log_images(self, step: int, name: str, images: Sequence[Any]) -> None:
        import numpy as np

        for i, image in enumerate(images):
            tag = name if len(images) == 1 else f"{name}/{i}"
            pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def finish(self, success: bool = True) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _code(text: str) -> str:
    """Text shown verbatim by TensorBoard's markdown (indented as a code block)."""
    return "\n".join("    " + line for line in text.splitlines())
