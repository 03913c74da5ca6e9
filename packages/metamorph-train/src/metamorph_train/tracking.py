"""The trainer's link to experiment tracking and validation: on rank 0 the run files
(``recipe.yaml``, ``run_info.json``, :mod:`metamorph_train.run_info`) are written and the
loggers started (:mod:`metamorph_train.loggers`); on every rank the validator is built
(:mod:`metamorph_train.validation`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from metamorph_core.checkpoint import jsonable
from metamorph_train.loggers import Loggers, build_loggers
from metamorph_train.run_info import run_info, write_run_files
from metamorph_train.validation import Validator


def validator(trainer: Any, eval_data: dict[str, Any] | None) -> Validator | None:
    """The trainer's validator, or ``None`` when ``train.eval_every`` is 0."""
    c = trainer.config
    if c.eval_every == 0:
        return None
    return Validator(trainer.objective, eval_data or {}, c, trainer.out)


def start(trainer: Any, start_step: int) -> Loggers:
    """Rank 0: write the run files and start the trainer's loggers (``trainer.loggers``, or
    those ``train.loggers`` names) for a run that continues after ``start_step``; other
    ranks: no loggers."""
    if trainer.rank != 0:
        return Loggers([])
    loggers = trainer.loggers
    if loggers is None:
        loggers = build_loggers(trainer.config.loggers)
    config = trainer.run_config
    if config is None:
        config = {"train": jsonable(dataclasses.asdict(trainer.config))}
    info = run_info(start_step, trainer.world)
    write_run_files(trainer.out, trainer.run_config, info)
    group = Loggers(loggers, trainer.log)
    group.start(trainer.out, config, info)
    return group
