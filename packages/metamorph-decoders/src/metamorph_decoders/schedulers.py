"""diffusers schedulers by name, built from the decoder's training noise schedule."""

from __future__ import annotations

from typing import Any

ALL = ("epsilon", "v_prediction", "sample")
NO_SAMPLE = ("epsilon", "v_prediction")

# name -> (diffusers class, extra config, prediction types it can step)
SCHEDULERS: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "ddpm": ("DDPMScheduler", {}, ALL),
    "ddim": ("DDIMScheduler", {}, ALL),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, NO_SAMPLE),
    "dpm-solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, ALL),
    "dpm-solver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}, ALL),
    "unipc": ("UniPCMultistepScheduler", {}, ALL),
    "euler": ("EulerDiscreteScheduler", {}, ALL),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}, NO_SAMPLE),
    "heun": ("HeunDiscreteScheduler", {}, ALL),
}


def make_scheduler(name: str, config: dict[str, Any], prediction_type: str) -> Any:
    """A fresh scheduler ``name`` sharing ``config``'s noise schedule and ``prediction_type``."""
    import diffusers

    check_scheduler(name, prediction_type)
    cls_name, extra, _ = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    return cls.from_config({**config, **extra, "prediction_type": prediction_type})


def check_scheduler(name: str, prediction_type: str) -> None:
    """``ValueError`` unless ``name`` is a known scheduler that can sample a model trained for
    ``prediction_type``."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler '{name}'; known: {', '.join(SCHEDULERS)}")
    if prediction_type not in SCHEDULERS[name][2]:
        fits = [n for n, (_, _, ts) in SCHEDULERS.items() if prediction_type in ts]
        raise ValueError(
            f"scheduler '{name}' cannot sample a model trained for prediction_type "
            f"'{prediction_type}'; use one of {', '.join(fits)}"
        )
