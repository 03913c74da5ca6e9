"""Exceptions raised by MetaMorph. Every message names the input, the expectation and the fix."""


class MetaMorphError(Exception):
    """Base class of every MetaMorph error."""


class ComponentNotFoundError(MetaMorphError, KeyError):
    """A component name that no installed plugin registers."""

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
    """A checkpoint directory that is incomplete, inconsistent or of an unknown format."""
