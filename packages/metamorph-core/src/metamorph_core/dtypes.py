"""Dtype names as they appear in configs (``"float32"``, ``"bfloat16"``, ``"float16"``)."""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` (or ``torch.bfloat16``) -> ``torch.bfloat16``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.") if isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not one of {', '.join(_DTYPES)}")


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's first parameter (float32 for a module without parameters)."""
    p = next(module.parameters(), None)
    return p.dtype if p is not None else torch.float32
