"""Run inside a fresh virtual environment that holds only MetaMorph's built wheels (and their
dependencies): `python wheel_smoke.py core` with metamorph-core alone, `python wheel_smoke.py
all` with every package. Checks the `metamorph` command and one training step of a tiny model,
built offline (no download)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def metamorph(*args: str) -> str:
    exe = Path(sys.executable).with_name("metamorph")
    res = subprocess.run([str(exe), *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"metamorph {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return res.stdout


def commands() -> set[str]:
    rows = json.loads(metamorph("plugins", "--json"))
    return {r["name"] for r in rows if r["kind"] == "command"}


def core() -> None:
    import importlib.util

    for other in ("metamorph_encoders", "metamorph_decoders", "metamorph_train", "metamorph_toy"):
        assert importlib.util.find_spec(other) is None, f"{other} is installed beside core alone"
    assert commands() == {"plugins", "generate", "merge-lora"}, commands()
    assert "generate" in metamorph("--help")
    assert "--model" in metamorph("generate", "--help")
    import torch

    from metamorph_core import MetaMorphModel
    from metamorph_core.testing import samples, save_tiny_backbone, tiny_model_config

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = MetaMorphModel.from_config(tiny_model_config(save_tiny_backbone(Path(tmp) / "bb")))
        batch = model.prepare_batch([samples.understanding(), samples.generation()])
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            after = model(**batch).loss
        assert after < loss, (loss.item(), after.item())
        loaded = MetaMorphModel.from_pretrained(model.save_pretrained(Path(tmp) / "ckpt"))
        with torch.no_grad():
            assert torch.equal(loaded(**batch).loss, model(**batch).loss)
    print(f"core alone: metamorph {sorted(commands())}; one step {loss.item():.3f} -> {after:.3f}")


def everything() -> None:
    want = {"plugins", "generate", "merge-lora", "train", "cache-features", "demo", "eval", "serve"}
    assert want <= commands(), commands()
    from metamorph_serve.app import STATIC

    assert (STATIC / "index.html").is_file(), "the chat page is missing from the serve wheel"
    import yaml
    from PIL import Image

    from metamorph_core import MetaMorphModel
    from metamorph_core.testing import save_tiny_backbone

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(root / "images" / "red.png")
        records = [
            {
                "image": "red.png",
                "conversations": [
                    {"from": "human", "value": "Generate an image of red."},
                    {"from": "gpt", "value": "Here it is: <image>"},
                ],
            }
        ]
        (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        recipe = {
            "objective": {"name": "vpit", "policy": "full"},
            "model": {
                "encoder": {"name": "tiny-patch", "kwargs": {"image_size": 16, "num_tokens": 4}},
                "backbone": {
                    "name": "llama",
                    "kwargs": {"pretrained": str(save_tiny_backbone(root / "bb"))},
                },
            },
            "data": {
                "sources": [{"path": str(root / "data.jsonl"), "image_root": str(root / "images")}]
            },
            "train": {
                "output_dir": str(root / "run"),
                "steps": 1,
                "batch_size": 1,
                "progress": False,
            },
        }
        (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        out = metamorph("train", str(root / "recipe.yaml"))
        summary = json.loads(out[out.index('{\n  "summary"') :])["summary"]
        assert summary["step"] == 1, summary
        MetaMorphModel.from_pretrained(summary["saved"])
    print(f"all packages: metamorph {sorted(commands())}; metamorph train: 1 step, saved, reloaded")


if __name__ == "__main__":
    {"core": core, "all": everything}[sys.argv[1]]()
