"""The component registry: discovers plugins through entry points and creates components by name.

Rules (docs/architecture.md, "Plugins"):
- plugins load lazily, on the first registry use;
- a plugin that fails to import or register is reported (distribution and error) and skipped,
  unless ``METAMORPH_STRICT_PLUGINS=1``, which turns that into :class:`PluginLoadError`;
- ``METAMORPH_LOAD_PLUGINS=a,b`` loads only the entry points named ``a`` and ``b``
  (an empty value loads none);
- two registrations of one name for one kind raise :class:`DuplicateComponentError` naming both
  distributions; an unknown name raises :class:`ComponentNotFoundError` listing the known names.

This module does not import torch.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as importlib_metadata
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from metamorph_core.errors import ComponentNotFoundError, DuplicateComponentError, PluginLoadError
from metamorph_core.plugins import hookspecs
from metamorph_core.plugins.first_party import PROVIDED_BY

_FIELD = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class ComponentEntry:
    """One registered component: its kind, name (maybe with ``{field}``s) and origin."""

    kind: str
    name: str
    factory: Callable[..., Any] | str
    distribution: str
    plugin: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    pattern: re.Pattern[str] | None = field(default=None, compare=False)

    def match(self, name: str) -> dict[str, int] | None:
        """Keyword fields if ``name`` names this entry (or an alias), else ``None``."""
        if name == self.name or name in self.aliases:
            return {}
        if self.pattern is not None:
            m = self.pattern.fullmatch(name)
            if m:
                return {k: int(v) for k, v in m.groupdict().items()}
        return None

    def load_factory(self) -> Callable[..., Any]:
        if callable(self.factory):
            return self.factory
        module, _, attr = self.factory.partition(":")
        try:
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise PluginLoadError(
                f"{self.kind} '{self.name}' from distribution '{self.distribution}' points to "
                f"'{self.factory}', which cannot be imported: {e}. Reinstall that distribution "
                "or fix its registration."
            ) from e
        return obj


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that was skipped, and why."""

    plugin: str
    distribution: str
    error: str


def _strict() -> bool:
    return os.environ.get("METAMORPH_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes"}


def _allowed_plugins() -> set[str] | None:
    value = os.environ.get("METAMORPH_LOAD_PLUGINS")
    if value is None:
        return None
    return {p.strip() for p in value.split(",") if p.strip()}


def _installed(distribution: str) -> bool:
    try:
        importlib_metadata.distribution(distribution)
    except importlib_metadata.PackageNotFoundError:
        return False
    return True


def _example(name: str) -> str:
    """A concrete name that a ``{field}`` name accepts (``mlp{depth}x_gelu`` -> ``mlp2x_gelu``)."""
    return _FIELD.sub("2", name)


def _name_pattern(name: str) -> re.Pattern[str] | None:
    """``mlp{depth}x_gelu`` -> a regex with an integer group ``depth``; ``None`` for plain names."""
    parts = _FIELD.split(name)  # literal, field, literal, field, ...
    if len(parts) == 1:
        return None
    regex = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>\\d+)" for i, part in enumerate(parts)
    )
    return re.compile(regex)


class Registry:
    """Components of every kind, keyed by name, with the distribution that provides each."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._entries: dict[str, list[ComponentEntry]] = {k: [] for k in hookspecs.KIND_HOOKS}
        self._failures: list[PluginFailure] = []
        self._load_entry_points = load_entry_points
        self._loaded = False
        self._load_error: DuplicateComponentError | PluginLoadError | None = None
        self._lock = threading.RLock()

    # -- loading ---------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        with self._lock:
            if self._load_error is not None:
                raise self._load_error
            if self._loaded:
                return
            self._loaded = True
            if self._load_entry_points:
                try:
                    self._load_from_entry_points()
                except (DuplicateComponentError, PluginLoadError) as e:
                    self._load_error = e  # every later use reports the same problem
                    raise

    def _load_from_entry_points(self) -> None:
        allowed = _allowed_plugins()
        eps = sorted(
            importlib_metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP),
            key=lambda ep: (ep.dist.name if ep.dist else "", ep.name),
        )
        seen: set[tuple[str, str]] = set()
        for ep in eps:
            dist = ep.dist.name if ep.dist is not None else "<unknown>"
            if (dist, ep.name) in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add((dist, ep.name))
            if allowed is not None and ep.name not in allowed:
                continue
            try:
                plugin = ep.load()
            except Exception as e:  # noqa: BLE001 - any import failure isolates the plugin
                self._fail(
                    ep.name, dist, f"import of '{ep.value}' failed: {type(e).__name__}: {e}", e
                )
                continue
            self.register_plugin(plugin, name=ep.name, distribution=dist)

    def _fail(self, plugin: str, distribution: str, error: str, exc: BaseException | None) -> None:
        message = (
            f"metamorph plugin '{plugin}' (distribution '{distribution}') was skipped: {error}"
        )
        if _strict():
            raise PluginLoadError(
                message + " (METAMORPH_STRICT_PLUGINS=1 turns this into an error; unset it to skip "
                "broken plugins)"
            ) from exc
        self._failures.append(PluginFailure(plugin, distribution, error))
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def register_plugin(self, plugin: object, *, name: str, distribution: str = "<local>") -> None:
        """Register a plugin object (module or instance with ``@hookimpl`` functions).

        Entry-point plugins go through here; tests and notebooks may call it directly. A plugin
        that fails is reported and skipped (or raises in strict mode); its partial registrations
        are rolled back.
        """
        self._ensure_loaded()
        with self._lock:
            api = getattr(plugin, "METAMORPH_PLUGIN_API", hookspecs.PLUGIN_API_VERSION)
            if api != hookspecs.PLUGIN_API_VERSION:
                self._fail(
                    name,
                    distribution,
                    f"it targets plugin API {api}, this metamorph-core provides "
                    f"{hookspecs.PLUGIN_API_VERSION}; upgrade the plugin or metamorph-core",
                    None,
                )
                return
            try:
                self._pm.register(plugin, name=name)
                self._pm.check_pending()
            except Exception as e:  # noqa: BLE001 - pluggy validation errors isolate the plugin
                if self._pm.is_registered(plugin):
                    self._pm.unregister(plugin)
                self._fail(name, distribution, f"{type(e).__name__}: {e}", e)
                return
            added: list[ComponentEntry] = []
            try:
                for kind, hook_name in hookspecs.KIND_HOOKS.items():
                    hook = getattr(self._pm.hook, hook_name)
                    for impl in hook.get_hookimpls():
                        if impl.plugin is plugin:
                            impl.function(
                                register=self._make_register(kind, name, distribution, added)
                            )
            except DuplicateComponentError:
                self._rollback(plugin, added)
                raise
            except Exception as e:  # noqa: BLE001
                self._rollback(plugin, added)
                self._fail(name, distribution, f"registration raised {type(e).__name__}: {e}", e)

    def _rollback(self, plugin: object, added: list[ComponentEntry]) -> None:
        for entry in added:
            self._entries[entry.kind].remove(entry)
        if self._pm.is_registered(plugin):
            self._pm.unregister(plugin)

    def _make_register(
        self, kind: str, plugin: str, distribution: str, added: list[ComponentEntry]
    ) -> Callable[..., None]:
        def register(
            name: str,
            factory: Callable[..., Any] | str,
            *,
            aliases: Iterable[str] = (),
            description: str = "",
        ) -> None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"{kind} names must be non-empty strings, got {name!r}")
            if isinstance(aliases, str):
                raise ValueError(
                    f"{kind} '{name}': aliases must be a list or tuple of names, got the "
                    f"string {aliases!r}; write aliases=({aliases!r},)"
                )
            entry = ComponentEntry(
                kind,
                name,
                factory,
                distribution,
                plugin,
                tuple(aliases),
                description,
                _name_pattern(name),
            )
            for other in self._entries[kind]:
                # A `{field}` name is compared through an example (fields set to 2), so two
                # patterns that accept the same names clash too.
                clash = [n for n in (name, *entry.aliases) if other.match(_example(n)) is not None]
                clash += [
                    n for n in (other.name, *other.aliases) if entry.match(_example(n)) is not None
                ]
                if clash:
                    raise DuplicateComponentError(
                        f"{kind} '{clash[0]}' is registered twice: by distribution "
                        f"'{other.distribution}' (plugin '{other.plugin}') and by distribution "
                        f"'{distribution}' (plugin '{plugin}'). Uninstall one of them or "
                        "restrict loading with METAMORPH_LOAD_PLUGINS."
                    )
            self._entries[kind].append(entry)
            added.append(entry)

        return register

    # -- queries ---------------------------------------------------------------------------
    @property
    def failures(self) -> list[PluginFailure]:
        """Plugins that were skipped because they failed to load or register."""
        self._ensure_loaded()
        return list(self._failures)

    def kinds(self) -> list[str]:
        return list(hookspecs.KIND_HOOKS)

    def entries(self, kind: str | None = None) -> list[ComponentEntry]:
        """Registered components, of one kind or of all, sorted by kind then name."""
        self._ensure_loaded()
        kinds = [self._check_kind(kind)] if kind is not None else list(self._entries)
        return [e for k in kinds for e in sorted(self._entries[k], key=lambda e: e.name)]

    def names(self, kind: str) -> list[str]:
        return [e.name for e in self.entries(kind)]

    def get(self, kind: str, name: str) -> tuple[ComponentEntry, dict[str, int]]:
        """The entry that provides ``name`` and the integer fields matched in it."""
        self._ensure_loaded()
        for entry in self._entries[self._check_kind(kind)]:
            fields = entry.match(name)
            if fields is not None:
                return entry, fields
        known = ", ".join(
            e.name + (f" (aliases: {', '.join(e.aliases)})" if e.aliases else "")
            for e in self.entries(kind)
        )
        allowed = _allowed_plugins()
        package = PROVIDED_BY.get((kind, name))
        if package is None:
            hint = " Install the plugin that provides it or pick a known name."
        elif not _installed(package):
            hint = (
                f" '{name}' comes with the {package} package, which is not installed "
                f"(pip install {package})."
            )
        elif allowed is not None or self._failures:
            hint = (
                f" '{name}' comes with the {package} package, which is installed but was not "
                "loaded:"
            )
        else:
            hint = (
                f" '{name}' comes with the {package} package, which is installed but did not "
                f"register it; reinstall it (pip install --force-reinstall {package})."
            )
        if allowed is not None:
            hint += (
                f" METAMORPH_LOAD_PLUGINS={os.environ['METAMORPH_LOAD_PLUGINS']!r} limits loading "
                "to those entry points ('core' provides metamorph-core's own components)."
            )
        if self._failures:
            hint += " Skipped plugins: " + "; ".join(
                f"'{f.plugin}' ({f.distribution}): {f.error}" for f in self._failures
            )
        raise ComponentNotFoundError(
            f"unknown {kind} '{name}'. Known {kind}s: {known or 'none'}.{hint}", kind, name, package
        )

    def create(self, kind: str, name: str, /, **kwargs: Any) -> Any:
        """Create the component ``name`` of ``kind`` with keyword configuration."""
        entry, fields = self.get(kind, name)
        for key in fields:
            if key in kwargs and kwargs[key] != fields[key]:
                raise ValueError(
                    f"{kind} '{name}' fixes {key}={fields[key]} but {key}={kwargs[key]} was "
                    "also passed; drop one of them"
                )
        component = entry.load_factory()(**{**kwargs, **fields})
        # Lets a model assembled from objects record which names built its parts; frozen
        # objects (templates) refuse attributes and are rebuilt from their name anyway.
        with contextlib.suppress(AttributeError):
            component.metamorph_spec = {"name": name, "kwargs": dict(kwargs)}
        return component

    def _check_kind(self, kind: str) -> str:
        if kind not in self._entries:
            raise ValueError(
                f"unknown component kind '{kind}'; kinds are {', '.join(self._entries)}"
            )
        return kind


_REGISTRY: Registry | None = None
_REGISTRY_LOCK = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, loading entry-point plugins on first use."""
    global _REGISTRY
    with _REGISTRY_LOCK:
        if _REGISTRY is None:
            _REGISTRY = Registry()
        return _REGISTRY


def reset_registry() -> None:
    """Forget loaded plugins so the next use re-discovers them (tests, environment changes)."""
    global _REGISTRY
    with _REGISTRY_LOCK:
        _REGISTRY = None


def create(kind: str, name: str, /, **kwargs: Any) -> Any:
    """``create("encoder", "siglip", num_tokens=64)``: a component by kind, name and config."""
    return get_registry().create(kind, name, **kwargs)
