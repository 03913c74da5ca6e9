"""First-party components of metamorph-core, registered through ``metamorph_core.builtin``."""
