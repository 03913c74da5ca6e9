"""metamorph-core's own components, registered through the ``metamorph`` entry-point group
like any third-party plugin. Factories are import strings, so listing them imports no torch."""

from __future__ import annotations

from metamorph_core.plugins.hookspecs import Register, hookimpl

_C = "metamorph_core.components"


@hookimpl
def register_encoders(register: Register) -> None:
    register(
        "tiny-patch",
        f"{_C}.tiny_encoder:TinyPatchEncoder",
        description="tiny random patch encoder for tests and demos (not pretrained)",
    )


@hookimpl
def register_projectors(register: Register) -> None:
    register("linear", f"{_C}.projectors:linear", description="Linear(c, d)")
    register(
        "mlp{depth}x_gelu",
        f"{_C}.projectors:mlp_gelu",
        description="Linear(c, d) then depth-1 x (GELU, Linear(d, d)); mlp2x_gelu is the paper's",
    )


@hookimpl
def register_backbones(register: Register) -> None:
    register(
        "hf-causal-lm",
        f"{_C}.hf_causal_lm:HFCausalLM",
        aliases=("llama", "qwen2", "qwen3"),
        description="any transformers causal LM (hub id, local directory, or config)",
    )


@hookimpl
def register_heads(register: Register) -> None:
    register("linear", f"{_C}.heads:linear", description="Linear(d, c), L2-normalised")
    register("mlp", f"{_C}.heads:mlp", description="Linear(d, d) GELU Linear(d, c) (the paper's)")
    register(
        "mlp{depth}x_gelu",
        f"{_C}.heads:mlp_gelu",
        description="depth x (Linear(d, d), GELU) then Linear(d, c); mlp2x_gelu: three linears",
    )


@hookimpl
def register_losses(register: Register) -> None:
    register("cosine", f"{_C}.losses:CosineLoss", description="1 - cos(pred, target) (paper)")
    register("mse", f"{_C}.losses:MSELoss", description="mean squared error")
    register("l1", f"{_C}.losses:L1Loss", description="mean absolute error")


@hookimpl
def register_templates(register: Register) -> None:
    register(
        "auto",
        "metamorph_core.tokenizer_template:AutoTemplate",
        description="the backbone tokenizer's own chat template, checked for prefix stability",
    )
    register("llama3", "metamorph_core.conversation:llama3", description="the paper's template")
    register("chatml", "metamorph_core.conversation:chatml", description="Qwen's ChatML")
    register("gemma", "metamorph_core.conversation:gemma", description="Gemma's turns")
    register("mistral", "metamorph_core.conversation:mistral", description="Mistral v0.3 [INST]")
    register("phi3", "metamorph_core.conversation:phi3", description="Phi-3's <|user|> turns")
    register(
        "plain",
        "metamorph_core.conversation:plain",
        description="no roles or turn markers; one-line answers (base models)",
    )


@hookimpl
def register_commands(register: Register) -> None:
    register(
        "plugins",
        "metamorph_core.cli.plugins:configure",
        description="list registered components and commands with their distributions",
    )
    register(
        "generate",
        "metamorph_core.cli.generate:configure",
        description="generate text and images from a prompt: metamorph generate --model DIR PROMPT",
    )
    register(
        "merge-lora",
        "metamorph_core.cli.merge_lora:configure",
        description="write a plain full checkpoint from a LoRA checkpoint",
    )
