"""Shared fixtures: tiny real backbones saved with save_pretrained, loaded by our loaders."""

import transformers

from metamorph_core.testing.fixtures import backbone_dirs, hub_cache, make_model  # noqa: F401

transformers.utils.logging.disable_progress_bar()
