"""``metamorph generate --model DIR PROMPT``: stream an answer, write its text, images and
visual tokens."""

from __future__ import annotations

import argparse
import json
import sys

from metamorph_core.cli import Run


def configure(parser: argparse.ArgumentParser) -> Run:
    g = parser
    g.add_argument("prompt", help="the user's message; '<image>' marks where an --image stands")
    g.add_argument("--model", required=True, help="a MetaMorph checkpoint directory")
    g.add_argument("--out", required=True, help="directory for text.txt, PNGs and result.json")
    g.add_argument("--image", action="append", default=[], help="an input image file (repeatable)")
    g.add_argument(
        "--force-image",
        action="store_true",
        help="text-to-image: the answer is one image (prefilled with <image_start>)",
    )
    g.add_argument(
        "--response-prefix",
        default=None,
        help="text the answer starts with (default: none; with --force-image the model's "
        "image_answer_prefix, 'Here is an image based on your request: ')",
    )
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument(
        "--visual-guidance-scale",
        type=float,
        default=1.0,
        help="the LLM's classifier-free guidance on visual tokens (1.0: off)",
    )
    d = g.add_argument_group("visual decoder (pixels from the visual tokens)")
    d.add_argument("--decoder-scheduler", help="the decoder's sampler (default: its own)")
    d.add_argument("--decoder-steps", type=int, help="denoising steps (default: its own)")
    d.add_argument(
        "--decoder-guidance-scale",
        type=float,
        help="the decoder's classifier-free guidance on pixels, 1.0 off (default: its own)",
    )
    d.add_argument("--decoder-seed", type=int, default=None, help="seed of the initial noise")
    d.add_argument("--no-decode", action="store_true", help="keep visual tokens, write no PNG")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    return run


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import transformers

    from metamorph_core import MetaMorphModel
    from metamorph_core.checkpoint import save_tensors
    from metamorph_core.generation import DoneEvent, GenerationConfig, ImageEvent, TextEvent

    transformers.utils.logging.disable_progress_bar()  # the answer streams to the terminal
    for image in args.image:
        if not Path(image).is_file():
            raise FileNotFoundError(f"--image '{image}': no such file")
    given = {
        "scheduler": args.decoder_scheduler,
        "steps": args.decoder_steps,
        "guidance_scale": args.decoder_guidance_scale,
        "seed": args.decoder_seed,
    }
    decoding = {k: v for k, v in given.items() if v is not None}  # over the decoder's own
    model = MetaMorphModel.from_pretrained(args.model, dtype=args.dtype).to(args.device).eval()
    decode = model.decoder is not None and not args.no_decode
    if decode:
        model.decoder.set_progress_bar(True)  # a bar with ETA on a terminal
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        visual_guidance_scale=args.visual_guidance_scale,
        decode_images=decode,
        decoding=decoding,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    events = model.stream(
        args.prompt,
        args.image,
        response_prefix=args.response_prefix,
        force_image=args.force_image,
        config=config,
    )
    written: list[Path] = []
    for event in events:
        if isinstance(event, TextEvent):
            print(event.text, end="", flush=True)
        elif isinstance(event, ImageEvent) and event.image is not None:
            written.append(out / f"image-{event.index}.png")
            event.image.save(written[-1])
        elif isinstance(event, DoneEvent):
            result = event.result
    print()
    (out / "text.txt").write_text(result.text + "\n")
    record = {
        "prompt": args.prompt,
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "images": [p.name for p in written],
    }
    written.append(out / "text.txt")
    if result.images:
        tokens = {f"image_{i}": t.contiguous().cpu() for i, t in enumerate(result.images)}
        save_tensors(tokens, out / "visual_tokens.safetensors", {"format": "pt"})
        written.append(out / "visual_tokens.safetensors")
        if not decode:
            why = "--no-decode" if args.no_decode else "the checkpoint has no visual decoder"
            print(
                f"{len(result.images)} image(s) kept as visual tokens only ({why}); attach a "
                "decoder with model.attach_decoder(...) and save the model to get PNGs",
                file=sys.stderr,
            )
    (out / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    written.append(out / "result.json")
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0
