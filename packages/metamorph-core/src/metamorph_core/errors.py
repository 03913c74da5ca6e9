"""Exceptions raised by MetaMorph. Every message names the input, the expectation and the fix."""


class MetaMorphError(Exception):
    """Base class of every MetaMorph error."""


class ComponentNotFoundError(MetaMorphError, KeyError):
    """A component name that no installed plugin registers: its ``kind`` and ``name``, and the
    ``package`` to install when one of metamorph's own packages provides it."""

    def __init__(
        self,
        message: str,
        kind: str | None = None,
        name: str | None = None,
        package: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind, self.name, self.package = kind, name, package

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DuplicateComponentError(MetaMorphError):
    """Two plugins register the same name for the same kind."""


class PluginLoadError(MetaMorphError):
    """A plugin failed to import or to register (raised only in strict mode)."""


class ShapeMismatchError(MetaMorphError, ValueError):
    """Two components that must agree on a dimension do not."""


class ConversationError(MetaMorphError, ValueError):
    """A conversation that cannot be turned into a training or prompt sequence."""


class CheckpointError(MetaMorphError):
    """A checkpoint directory that is incomplete, damaged, inconsistent or of an unknown format,
    or that needs a component or base model that is not there."""
