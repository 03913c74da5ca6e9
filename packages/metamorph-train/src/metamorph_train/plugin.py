"""metamorph-train's plugins, registered through the ``metamorph`` entry-point group: task
builders, training objectives and the ``train`` / ``cache-features`` commands."""

from __future__ import annotations

from metamorph_core.plugins.hookspecs import Register, hookimpl

_O = "metamorph_train.objectives"


@hookimpl
def register_tasks(register: Register) -> None:
    from metamorph_train.tasks import TASKS  # light: no torch

    for name, (fn, description) in TASKS.items():
        register(name, lambda fn=fn: fn, description=description)


@hookimpl
def register_objectives(register: Register) -> None:
    register(
        "vpit",
        f"{_O}.vpit:VPiTObjective",
        description="visual-predictive instruction tuning; policy full / projector / lora",
    )
    register(
        "decoder",
        f"{_O}.decoder:DecoderObjective",
        description="a visual decoder learning to draw images from encoder tokens",
    )
    register(
        "siglip",
        f"{_O}.siglip:SiglipObjective",
        description="SigLIP sigmoid-loss pretraining of a small encoder",
    )
    register(
        "causal-lm",
        f"{_O}.causal_lm:CausalLMObjective",
        description="next-token pretraining of a transformers causal LM",
    )


@hookimpl
def register_loggers(register: Register) -> None:
    at = "metamorph_train.loggers"
    register("jsonl", f"{at}.jsonl:JSONLLogger", description="output_dir/metrics.jsonl (default)")
    register(
        "tensorboard",
        f"{at}.tensorboard:TensorBoardLogger",
        description="TensorBoard event files (extra: tensorboard)",
    )
    register(
        "wandb",
        f"{at}.wandb:WandbLogger",
        description="a Weights & Biases run, online or offline (extra: wandb)",
    )
    register(
        "mlflow",
        f"{at}.mlflow:MLflowLogger",
        description="an MLflow run, by default a local SQLite store (extra: mlflow)",
    )


@hookimpl
def register_commands(register: Register) -> None:
    register(
        "train",
        "metamorph_train.commands:configure_train",
        description="train with a recipe: metamorph train RECIPE.yaml key=value ...",
    )
    register(
        "cache-features",
        "metamorph_train.commands:configure_cache_features",
        description="encode a dataset's images once into a feature cache",
    )
    register(
        "convert-research",
        "metamorph_train.research.command:configure",
        description="convert a checkpoint of the research code (facebookresearch/metamorph)",
    )
    register(
        "export",
        "metamorph_train.export:configure",
        description="a trainer checkpoint (sharded or not) as a model: metamorph export CKPT OUT",
    )
    register(
        "data",
        "metamorph_train.data.command:configure",
        description="data tools: metamorph data convert --to webdataset|parquet|hf ...",
    )
