"""Experiment tracking: the :class:`Logger` interface, plugins of kind ``logger`` (hook
``register_loggers``) that the trainer sends metrics, the resolved recipe, run information and
validation samples to.

A recipe lists them by registry name, each optionally with keyword arguments::

    train:
      loggers: [jsonl, tensorboard, {name: wandb, kwargs: {project: my-project}}]

Built in (metamorph-train): ``jsonl`` (``output_dir/metrics.jsonl``, the default), and, each
needing its extra, ``tensorboard`` (``pip install 'metamorph-train[tensorboard]'``),
``wandb`` (``[wandb]``; offline with ``WANDB_MODE=offline`` or ``kwargs: {mode: offline}``)
and ``mlflow`` (``[mlflow]``; by default a local SQLite store under ``output_dir``). Only rank
0 logs. Every logger continues the same run when training resumes (see each class).
"""

from __future__ import annotations

import contextlib
import importlib
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "Logger",
    "Loggers",
    "build_loggers",
    "flatten",
    "kept_rng",
    "logger_specs",
    "require",
]


class Logger:
    """Where a training run reports. The trainer calls, on rank 0 only: :meth:`start` once
    (before the first step of this process, also when resuming), then :meth:`log_metrics`,
    :meth:`log_text` and :meth:`log_images` with increasing steps, and :meth:`finish` once.

    Contract of the arguments:

    - ``run_dir``: the run's ``output_dir``; a logger keeps its files (or the id of its remote
      run) there so that a resumed run continues the same record.
    - ``config``: the resolved recipe as a plain mapping (what ``output_dir/recipe.yaml``
      holds), or ``{"train": TrainerConfig fields}`` when the trainer runs without a recipe.
    - ``meta``: run information: ``versions`` (distribution -> version or ``None``),
      ``git_commit`` (or ``None``), ``git_dirty``, ``python``, ``started`` (ISO time),
      ``world_size`` and ``start_step`` (0 for a new run; N when resuming after step N:
      records of steps above N left by a killed process are stale).
    - ``namespace``: ``"train"`` for the training rows (keys ``text_loss``, ``lr``, ...),
      ``"eval"`` for validation (keys ``SOURCE/text_loss``, ``seconds``, ...).
    - ``images``: PIL images (validation logs one grid per call).

    Heavy libraries are imported in ``__init__`` (so a missing extra fails before training
    starts, through :func:`require`), never at module top.
    """

    name = "logger"

    def start(self, run_dir: Path, config: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        """Open (or continue) the run's record."""

    def log_metrics(
        self, step: int, metrics: Mapping[str, float], namespace: str = "train"
    ) -> None:
        """Record scalar ``metrics`` (name -> number) at ``step``."""
        raise NotImplementedError

    def log_text(self, step: int, name: str, text: str) -> None:
        """Record a piece of (markdown) text under ``name`` at ``step``."""

    def log_images(self, step: int, name: str, images: Sequence[Any]) -> None:
        """Record PIL ``images`` under ``name`` at ``step``."""

    def finish(self, success: bool = True) -> None:
        """Close the record; ``success`` False when training stopped on an exception."""


def require(module: str, logger: str, extra: str) -> Any:
    """Import ``module`` for the logger ``logger``, or raise an ImportError naming the
    ``metamorph-train`` extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"logger '{logger}' (train.loggers) needs the '{module}' package, which is not "
            f"installed ({e}); install it with: pip install 'metamorph-train[{extra}]', or drop "
            f"'{logger}' from train.loggers"
        ) from e


def logger_specs(value: Any) -> list[tuple[str, dict[str, Any]]]:
    """``train.loggers`` -> ``[(name, kwargs)]``. Accepts a name, or a list whose entries are
    names or ``{name: NAME, kwargs: {...}}`` mappings; raises ValueError naming the entry."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(
            f"recipe key 'train.loggers' = {value!r} must be a list of logger names or "
            "{name: NAME, kwargs: {...}} entries, e.g. [jsonl, tensorboard]"
        )
    specs: list[tuple[str, dict[str, Any]]] = []
    for i, entry in enumerate(value):
        where = f"train.loggers[{i}]"
        if isinstance(entry, str):
            name, kwargs = entry, {}
        elif isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
            extra = sorted(set(entry) - {"name", "kwargs"})
            if extra:
                raise ValueError(
                    f"recipe key '{where}' has unknown key(s) {extra}; use name, kwargs"
                )
            name, kwargs = entry["name"], dict(entry.get("kwargs") or {})
        else:
            raise ValueError(
                f"recipe key '{where}' = {entry!r} must be a logger name or {{name: NAME, "
                "kwargs: {...}}"
            )
        if any(name == n for n, _ in specs):
            raise ValueError(f"recipe key 'train.loggers' names the logger '{name}' twice")
        specs.append((name, kwargs))
    return specs


def build_loggers(value: Any) -> list[Logger]:
    """The loggers ``train.loggers`` names, created through the registry (kind ``logger``).
    An unknown name raises ValueError listing the known ones; a logger whose library is not
    installed raises ImportError naming its extra."""
    from metamorph_core.errors import ComponentNotFoundError
    from metamorph_core.plugins.registry import get_registry

    out = []
    for i, (name, kwargs) in enumerate(logger_specs(value)):
        try:
            logger = get_registry().create("logger", name, **kwargs)
        except ComponentNotFoundError as e:
            raise ValueError(f"recipe key 'train.loggers[{i}]': {e}") from e
        except TypeError as e:
            raise ValueError(
                f"recipe key 'train.loggers[{i}]': logger '{name}' does not take kwargs "
                f"{sorted(kwargs)} ({e})"
            ) from e
        out.append(logger)
    return out


class Loggers:
    """Several loggers as one. :meth:`start` errors propagate (a misconfigured logger stops
    the run before training); an error while logging is reported once through ``log`` and
    that logger is dropped, so a tracking outage never stops training."""

    def __init__(self, loggers: Sequence[Logger], log: Callable[[str], None] | None = None):
        self.loggers = list(loggers)
        self.log = log

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def _each(self, method: str, *args: Any) -> None:
        for logger in list(self.loggers):
            try:
                with kept_rng():  # a library drawing random ids must not move training's RNG
                    getattr(logger, method)(*args)
            except Exception as e:  # noqa: BLE001 - tracking must not stop training
                self.loggers.remove(logger)
                message = (
                    f"logger '{getattr(logger, 'name', type(logger).__name__)}' failed in "
                    f"{method} ({type(e).__name__}: {e}); it is switched off for this run"
                )
                if self.log is not None:
                    self.log(message)
                else:
                    import warnings

                    warnings.warn(message, RuntimeWarning, stacklevel=2)

    def start(self, run_dir: Path, config: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        with kept_rng():
            for logger in self.loggers:
                logger.start(run_dir, config, meta)

    def log_metrics(
        self, step: int, metrics: Mapping[str, float], namespace: str = "train"
    ) -> None:
        self._each("log_metrics", step, metrics, namespace)

    def log_text(self, step: int, name: str, text: str) -> None:
        self._each("log_text", step, name, text)

    def log_images(self, step: int, name: str, images: Sequence[Any]) -> None:
        self._each("log_images", step, name, images)

    def finish(self, success: bool = True) -> None:
        self._each("finish", success)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


@contextlib.contextmanager
def kept_rng() -> Iterator[None]:
    """Restore the torch (CPU and initialised CUDA), Python and NumPy random states after the
    block, so that what runs in it cannot change a training run's random draws."""
    import torch

    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    py = random.getstate()
    try:
        import numpy as np

        np_state: Any = np.random.get_state()
    except ImportError:  # pragma: no cover
        np_state = None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        if np_state is not None:
            np.random.set_state(np_state)
