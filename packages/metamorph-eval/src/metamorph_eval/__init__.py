"""MetaMorph evaluation: ``metamorph eval understanding`` (VQA, multiple choice with MMBench's
circular evaluation, exact match; registered ``eval_task`` plugins over a documented JSONL
layout), ``metamorph eval generation`` (Fréchet distance, CLIP score, GenEval / DPG-Bench
layouts), the ``metamorph`` model for lmms-eval, and resumable per-sample records."""

__version__ = "0.1.0"
