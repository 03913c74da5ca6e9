"""``wandb``: a Weights & Biases run (``pip install 'metamorph-train[wandb]'``).

Metrics are keyed ``NAMESPACE/KEY`` at their step; the resolved recipe is the run's config
(with ``run_info`` added) and ``recipe.yaml`` a saved file; validation text is logged as HTML,
images as ``wandb.Image``. Files go under ``output_dir/wandb``. Offline: ``WANDB_MODE=offline``
or ``kwargs: {mode: offline}`` (``wandb sync output_dir/wandb/offline-run-*`` uploads later).

Resume: the run id is kept in ``output_dir/wandb_run.json`` and reused with
``resume="allow"``, so a resumed training continues the same W&B run (offline, each process
writes its own ``offline-run-TIME-ID`` directory, TIME to the second; syncing joins them). W&B drops
values logged at a step below one it already holds, so steps redone after a kill are logged
once.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from metamorph_train.loggers import Logger, require

RUN_FILE = "wandb_run.json"


class WandbLogger(Logger):
    """A W&B run; ``init_kwargs`` go to ``wandb.init`` (``project``, ``entity``, ``name``,
    ``tags``, ``group``, ``notes``, ``mode``, ...)."""

    name = "wandb"

    def __init__(self, project: str = "metamorph", **init_kwargs: Any) -> None:
        self.wandb = require("wandb", self.name, "wandb")
        self.project, self.init_kwargs = project, init_kwargs
        self.run: Any = None

    def start(self, run_dir: Path, config: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        wandb = self.wandb
        run_dir = Path(run_dir)
        stored = run_dir / RUN_FILE
        run_id = json.loads(stored.read_text())["id"] if stored.is_file() else None
        run_id = run_id or wandb.util.generate_id()
        kwargs = dict(self.init_kwargs)
        mode = kwargs.get("mode") or os.environ.get("WANDB_MODE", "online")
        if mode not in ("offline", "disabled"):  # offline runs ignore resume (and warn)
            kwargs.setdefault("resume", "allow")
        kwargs.setdefault("name", run_dir.name)
        # the trainer prints its own lines and progress bar: wandb neither captures the
        # console nor prints its run summary (pass settings to change that)
        kwargs.setdefault("settings", wandb.Settings(console="off", quiet=True))
        self.run = wandb.init(project=self.project, dir=str(run_dir), id=run_id, **kwargs)
        # a resumed run may change settings (train.steps ...): the newest recipe wins
        self.run.config.update({**dict(config), "run_info": dict(meta)}, allow_val_change=True)
        stored.write_text(json.dumps({"id": run_id}) + "\n")
        recipe = run_dir / "recipe.yaml"
        if recipe.is_file():
            self.run.save(str(recipe), base_path=str(run_dir), policy="now")

    def log_metrics(
        self, step: int, metrics: Mapping[str, float], namespace: str = "train"
    ) -> None:
        self.run.log({f"{namespace}/{k}": v for k, v in metrics.items()}, step=step)

    def log_text(self, step: int, name: str, text: str) -> None:
        self.run.log({name: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def log_images(self, step: int, name: str, images: Sequence[Any]) -> None:
        self.run.log({name: [self.wandb.Image(image) for image in images]}, step=step)

    def finish(self, success: bool = True) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if success else 1)
            self.run = None
