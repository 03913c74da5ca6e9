"""Evaluating image generation: ``metamorph eval generation``.

- :mod:`.prompts`: the prompt files read (JSONL with ``prompt``, GenEval's
  ``evaluation_metadata.jsonl``, DPG-Bench's ``prompts/`` folder, one prompt a line).
- :mod:`.images`: reading image folders (a reference set) with ``raise`` / ``skip`` on bad files.
- :mod:`.frechet`: the Fréchet distance between feature sets, accumulated by streaming, in the
  feature space of the standard InceptionV3 (FID, weights given by path) or of any registered
  MetaMorph encoder (e.g. a "Fréchet SigLIP distance").
- :mod:`.clip_score`: CLIP score with a local CLIP or SigLIP checkpoint.
- :mod:`.metrics`: the metrics by name (``fid``, ``fd-encoder``, ``clip``), their checks and the
  cache of reference statistics.
- :mod:`.writers`: the GenEval and DPG-Bench image layouts their official scorers read.
- :mod:`.runner`: :func:`~.runner.evaluate_generation`, resumable and reproducible.
- :mod:`.command`: the command line.

Importing this package imports no torch.
"""
