"""The ``metamorph`` model for lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval).

Install the extra and run any lmms-eval task on a MetaMorph checkpoint::

    pip install 'metamorph-eval[lmms]'
    lmms-eval --model metamorph --model_args pretrained=CKPT,dtype=bfloat16 \\
        --tasks mme --batch_size 8 --output_path out/ --log_samples

lmms-eval finds the model through its documented plugin mechanism, the ``lmms_eval.models``
entry-point group: metamorph-eval declares ``metamorph = "metamorph_eval.lmms:manifest"``, and
lmms-eval calls :func:`manifest` for the :class:`~lmms_eval.models.registry_v2.ModelManifest`
that names the class (:class:`~metamorph_eval.lmms.model.MetaMorphLMMS`, a "simple" model:
lmms-eval hands it the task's text and images, and the model applies its own chat template).

``import metamorph_eval.lmms`` works without lmms-eval; :func:`manifest` and the model class
need it and say how to install it when it is missing.
"""

from __future__ import annotations

from typing import Any

#: the name lmms-eval's ``--model`` takes
MODEL_ID = "metamorph"
#: where lmms-eval imports the model class from
CLASS_PATH = "metamorph_eval.lmms.model.MetaMorphLMMS"
INSTALL_HINT = "pip install 'metamorph-eval[lmms]'"


def require_lmms_eval() -> None:
    """Raise an ``ImportError`` that says how to install lmms-eval when it is missing."""
    try:
        import lmms_eval  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"the metamorph model for lmms-eval needs lmms-eval, which is not installed: "
            f"{INSTALL_HINT}"
        ) from e


def manifest() -> Any:
    """The ``ModelManifest`` lmms-eval registers for ``--model metamorph`` (the payload of our
    ``lmms_eval.models`` entry point; lmms-eval calls it when it builds its model registry)."""
    require_lmms_eval()
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def __getattr__(name: str) -> Any:
    if name == "MetaMorphLMMS":  # imported on first use: it needs lmms-eval and torch
        from metamorph_eval.lmms.model import MetaMorphLMMS

        return MetaMorphLMMS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CLASS_PATH", "MODEL_ID", "MetaMorphLMMS", "manifest", "require_lmms_eval"]
