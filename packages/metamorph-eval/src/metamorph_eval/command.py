"""``metamorph eval understanding`` and ``metamorph eval generation``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metamorph_core.cli import Run


def configure(parser: argparse.ArgumentParser) -> Run:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    u = sub.add_parser(
        "understanding",
        help="answer benchmark questions and score them (VQA, multiple choice, exact match)",
        description="Ask a checkpoint every question of one or more task files (the JSONL "
        "layout of metamorph_eval.records) and score the answers; results per task in "
        "OUT/<task>/ (results.json, samples.jsonl), OUT/results.json for all. Rerun the same "
        "command to resume.",
    )
    u.add_argument("--model", required=True, help="a MetaMorph checkpoint directory")
    u.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        metavar="[NAME=]FILE",
        help="task files; NAME (a registered eval task: vqa, multiple-choice, exact-match, ...) "
        "picks how to score, else it is guessed from the records",
    )
    u.add_argument("--image-root", default=None, help="directory the records' images are in")
    u.add_argument("--out", required=True, help="directory for the results")
    u.add_argument("--batch-size", type=int, default=8)
    u.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's")
    u.add_argument("--no-circular", action="store_true", help="multiple choice: ask once")
    u.add_argument("--limit", type=int, default=None, help="only the first N records a task")
    u.add_argument("--on-error", default="raise", choices=["raise", "skip"])
    u.add_argument("--device", default="cpu")
    u.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    u.set_defaults(what_run=run_understanding)
    i = sub.add_parser(
        "images",
        help="generate an image per prompt and score each with an image task (e.g. a judge)",
        description="Generate, decode and score one image per prompt record ({id, prompt, "
        "response_prefix?, ...}) with a registered image task; OUT/images/<id>.png, "
        "samples.jsonl, results.json. Rerun the same command to resume.",
    )
    i.add_argument("--model", required=True, help="a MetaMorph checkpoint (with a decoder)")
    i.add_argument(
        "--decoder",
        default=None,
        metavar="DIR",
        help="a saved visual decoder to attach, when the checkpoint has none",
    )
    i.add_argument("--decoder-name", default="sd-unet", help="the registry name of --decoder")
    i.add_argument("--task", required=True, help="a registered image task, e.g. toy-judge")
    i.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the task (repeatable), e.g. judge=runs/demo/judge",
    )
    i.add_argument("--prompts", required=True, help="JSONL prompt records")
    i.add_argument("--out", required=True, help="directory for the images and results")
    i.add_argument("--batch-size", type=int, default=8)
    i.add_argument("--seed", type=int, default=0, help="decoder noise: image k gets seed + k")
    i.add_argument("--decoder-steps", type=int, default=None)
    i.add_argument("--decoder-guidance-scale", type=float, default=None)
    i.add_argument("--decoder-scheduler", default=None)
    i.add_argument("--device", default="cpu")
    i.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    i.set_defaults(what_run=run_images)
    try:
        from metamorph_eval.generation.command import configure_generation
    except ImportError:  # pragma: no cover - the generation half is part of this package
        pass
    else:
        g = sub.add_parser(
            "generation",
            help="generate images for prompts; Fréchet distance, CLIP score, GenEval/DPG layouts",
        )
        g.set_defaults(what_run=configure_generation(g))
    return lambda args: args.what_run(args)


def _task_specs(specs: list[str]) -> list[tuple[str | None, Path]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        out.append((name, Path(path)) if sep else (None, Path(spec)))
    return out


def run_understanding(args: argparse.Namespace) -> int:
    from metamorph_core import MetaMorphModel, create
    from metamorph_eval.harness import evaluate_understanding, model_identity
    from metamorph_eval.records import read_records
    from metamorph_eval.runs import file_sha256
    from metamorph_eval.tasks import EvalTask, guess_task

    specs = _task_specs(args.tasks)
    loaded = []
    for name, path in specs:  # read and check every file before loading the model
        counts: dict[str, int] = {}
        records = read_records(path, args.on_error, counts)[: args.limit]
        task_name = name or guess_task(records)
        options = {"circular": False} if args.no_circular and task_name == "multiple-choice" else {}
        task = create("eval_task", task_name, **options)
        if not isinstance(task, EvalTask):
            raise ValueError(
                f"eval task '{task_name}' scores images, not answers; use metamorph eval images"
            )
        loaded.append((path, records, task, counts))
    model = MetaMorphModel.from_pretrained(args.model, dtype=args.dtype).to(args.device).eval()
    identity = model_identity(args.model)
    out = Path(args.out)
    summary = {}
    for path, records, task, counts in loaded:
        name = task.name if len(loaded) == 1 else f"{path.stem}"
        results = evaluate_understanding(
            model,
            task,
            records,
            out / name,
            image_root=args.image_root,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            on_error=args.on_error,
            model_id=identity,
            data_id={"path": str(path), "sha256": file_sha256(path), "limit": args.limit},
        )
        results["skipped"] = {**results["skipped"], **counts}
        summary[name] = results
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, results in summary.items():
        acc = results["metrics"]["accuracy"]
        lo, hi = acc["ci95"] or (None, None)
        print(f"{name:<24} accuracy {acc['value']:.4f} (95% CI {lo:.4f}-{hi:.4f}, n={acc['n']})")
    print(f"results: {out / 'results.json'}")
    return 0


def run_images(args: argparse.Namespace) -> int:
    from metamorph_core import MetaMorphModel, create
    from metamorph_eval.harness import model_identity
    from metamorph_eval.images import evaluate_images, read_prompts
    from metamorph_eval.runs import file_sha256

    options = {}
    for item in args.task_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--task-option '{item}' must look like KEY=VALUE")
        options[key] = value
    from metamorph_eval.images import ImageTask

    task = create("eval_task", args.task, **options)
    if not isinstance(task, ImageTask):
        raise ValueError(
            f"eval task '{args.task}' scores answers, not images; use metamorph eval understanding"
        )
    records = read_prompts(args.prompts)
    model = MetaMorphModel.from_pretrained(args.model, dtype=args.dtype)
    if args.decoder is not None:
        model.attach_decoder(create("decoder", args.decoder_name, pretrained=args.decoder))
    model = model.to(args.device).eval()
    given = {
        "steps": args.decoder_steps,
        "guidance_scale": args.decoder_guidance_scale,
        "scheduler": args.decoder_scheduler,
    }
    results = evaluate_images(
        model,
        task,
        records,
        args.out,
        batch_size=args.batch_size,
        seed=args.seed,
        decoding={k: v for k, v in given.items() if v is not None},
        model_id=model_identity(args.model),
        data_id={"path": str(args.prompts), "sha256": file_sha256(Path(args.prompts))},
        decoder=args.decoder,
    )
    acc = results["metrics"]["accuracy"]
    lo, hi = acc["ci95"] or (None, None)
    print(f"{task.name}: accuracy {acc['value']:.4f} (95% CI {lo:.4f}-{hi:.4f}, n={acc['n']})")
    return 0
