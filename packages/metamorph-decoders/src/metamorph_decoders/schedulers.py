"""diffusers schedulers by name, built from the decoder's training noise schedule."""

from __future__ import annotations

from typing import Any

# name -> (diffusers class, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "dpm-solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm-solver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
}


def make_scheduler(name: str, config: dict[str, Any], prediction_type: str) -> Any:
    """A fresh scheduler ``name`` sharing ``config``'s noise schedule and ``prediction_type``."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler '{name}'; known: {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    return cls.from_config({**config, **extra, "prediction_type": prediction_type})
