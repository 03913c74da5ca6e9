"""The plugin system: pluggy hook specs (``hookspecs``) and the component registry (``registry``)."""
