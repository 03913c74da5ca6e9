"""The training loader: images read and preprocessed in worker processes, the same
micro-batches whatever the number of workers, exact resume from its state (also with another
number of workers), bad images named or skipped and counted in the main process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from metamorph_core import MetaMorphModel
from metamorph_core.cli import main as cli
from metamorph_core.conversation import PixelValues
from metamorph_core.testing import save_tiny_backbone, tiny_model_config, torchrun_argv
from metamorph_decoders.testing import tiny_unet_config
from metamorph_encoders.testing import save_tiny_siglip2
from metamorph_train.data import ConversationDataset, ImageDataset, Mixture
from metamorph_train.data.loader import Loaded, Loader
from metamorph_train.objectives import DecoderObjective, VPiTObjective

SCRIPT = Path(__file__).with_name("loader_script.py")


def _records(n, broken=()):
    out = []
    for i in range(n):
        generation = i % 3 == 0  # a generation sample: prompt dropout may empty its prompt
        out.append(
            {
                "id": f"r{i}",
                "image": "broken.png" if i in broken else f"{i}.png",
                "conversations": [
                    {"from": "human", "value": f"draw {i}" if generation else "<image>\nwhat?"},
                    {"from": "gpt", "value": "<image>" if generation else f"answer {i}"},
                ],
            }
        )
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    (root / "img").mkdir()
    for i in range(12):
        pixels = np.random.RandomState(i).randint(0, 256, (20 + i, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
    (root / "img" / "broken.png").write_bytes(b"not a png")
    (root / "r.jsonl").write_text("\n".join(json.dumps(r) for r in _records(12)) + "\n")
    bad = _records(12, broken={4, 7})
    (root / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in bad) + "\n")
    return root


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("bb") / "llama", "llama", seed=1)


@pytest.fixture(scope="module")
def vpit(backbone):
    torch.manual_seed(0)
    model = MetaMorphModel.from_config(tiny_model_config(backbone))
    return VPiTObjective(model, prompt_dropout=0.5)


def _draw(objective, world, workers, n, state=None, data="r.jsonl", on_error="raise", rank=0):
    dataset = ConversationDataset(world / data, world / "img", on_error=on_error)
    loader = Loader(
        Mixture({"a": dataset}, {"a": 1.0}, seed=3),
        objective,
        per_rank=3,
        rank=rank,
        world=2 if rank else 1,
        num_workers=workers,
    )
    if state is not None:
        loader.load_state_dict(state)
    batches = [loader.next() for _ in range(n)]
    state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint keeps
    loader.close()
    return batches, state, loader, dataset


def _key(batches):
    """What a micro-batch is: ids, prompts (dropped or not) and the preprocessed pixels."""
    return [
        [(c.id, c.turns[0].content, [x.pixels for x in c.images]) for c in batch]
        for batch in batches
    ]


def _same(a, b):
    ka, kb = _key(a), _key(b)
    assert [[(i, p) for i, p, _ in batch] for batch in ka] == [
        [(i, p) for i, p, _ in batch] for batch in kb
    ]
    for xa, xb in zip(ka, kb, strict=True):
        for (_, _, pa), (_, _, pb) in zip(xa, xb, strict=True):
            assert len(pa) == len(pb) and all(
                torch.equal(u, v) for u, v in zip(pa, pb, strict=True)
            )


def test_workers_give_the_micro_batches_one_process_gives(vpit, world):
    alone, _, _, _ = _draw(vpit, world, 0, 6)
    workers, _, _, _ = _draw(vpit, world, 2, 6)
    _same(alone, workers)
    images = [x for batch in workers for c in batch for x in c.images]
    # preprocessed by the encoder in the workers: stacked by prepare_batch as they are
    assert images and all(isinstance(x, PixelValues) for x in images)
    assert {tuple(x.pixels.shape) for x in images} == {(3, *vpit.module.encoder.image_size)}
    dropped = [c for batch in workers for c in batch if c.turns[0].content == ""]
    assert dropped, "prompt dropout is decided in the draw and reaches the items"


@pytest.mark.parametrize(("before", "after"), [(2, 2), (2, 0), (0, 2), (1, 2)])
def test_resume_continues_with_the_next_micro_batch(vpit, world, before, after):
    whole, _, _, _ = _draw(vpit, world, 0, 7)
    first, state, _, _ = _draw(vpit, world, before, 3)
    rest, _, _, _ = _draw(vpit, world, after, 4, state)
    _same(first + rest, whole)


def test_ranks_keep_their_share_of_the_same_global_batch(vpit, world):
    one, _, _, _ = _draw(vpit, world, 0, 2)  # 3 per micro-batch, one rank
    # per_rank 3 on 2 ranks: each rank reads only its 3 of the global 6
    r1, _, _, _ = _draw(vpit, world, 2, 1, rank=1)
    ids = [c.id for c in r1[0]]
    assert len(ids) == 3 and ids == [c.id for c in (one[0] + one[1])[1::2]]


def test_bad_images_raise_naming_them_or_are_skipped_and_counted(vpit, world):
    with pytest.raises(Exception, match="broken.png"):
        _draw(vpit, world, 2, 6, data="bad.jsonl")
    batches, _, loader, dataset = _draw(vpit, world, 2, 6, data="bad.jsonl", on_error="skip")
    ids = {c.id for batch in batches for c in batch}
    assert ids and not ids & {"r4", "r7"}
    assert loader.skipped == dataset.errors.summary()["bad_images"] > 0
    # the workers skip exactly what one process skips
    alone, _, lone, _ = _draw(vpit, world, 0, 6, data="bad.jsonl", on_error="skip")
    _same(alone, batches)
    assert lone.skipped == loader.skipped


@pytest.mark.parametrize("naflex", [False, True])
def test_decoder_items_are_fitted_and_preprocessed_in_workers(world, tmp_path, naflex):
    from metamorph_core import create

    if naflex:  # preprocess gives fields (SigLIP 2 keeps each image's aspect ratio)
        tower = save_tiny_siglip2(tmp_path / "siglip2")
        encoder = create("encoder", "siglip2", pretrained=str(tower), num_tokens=4)
    else:
        encoder = create("encoder", "tiny-patch", image_size=16, hidden_size=24, num_tokens=4)
    unet = tiny_unet_config(sample_size=8)
    decoder = create(
        "decoder",
        "sd-unet",
        unet_config=unet,
        adapter={"name": "mlp", "kwargs": {"hidden_dims": [32]}},
        context_length=4,
        token_dim=encoder.hidden_size,
        num_tokens=4,
    )
    objective = DecoderObjective(decoder, encoder)

    def mixture():
        return Mixture({"a": ImageDataset(world / "r.jsonl", world / "img")}, {"a": 1.0})

    loader = Loader(mixture(), objective, per_rank=3, num_workers=2)
    items = loader.next()
    loader.close()
    assert all(p.shape == (3, 8, 8) for item in items for p in item.pixels)
    # the batch of worker-made items equals the batch of the same items read in-process
    plain = mixture()
    raw = [plain.next()[1] for _ in range(3)]
    made, again = objective.batch(items, 0), objective.batch(raw, 0)
    assert raw[0].encoder_pixels is None
    assert torch.equal(made["pixels"], again["pixels"])
    if naflex:
        assert len({tuple(s) for s in made["encoder_pixels"]["spatial_shapes"].tolist()}) > 1
        assert all(
            torch.equal(made["encoder_pixels"][k], v) for k, v in again["encoder_pixels"].items()
        )
    else:
        assert all(p.shape == (3, 16, 16) for item in items for p in item.encoder_pixels)
        assert torch.equal(made["encoder_pixels"], again["encoder_pixels"])
    (loss,) = objective.loss_sums(objective.module, made)
    assert torch.isfinite(loss)


def test_loaded_batches_pin_every_tensor_they_hold():
    if not torch.cuda.is_available():
        pytest.skip("pinned memory needs a GPU")
    loaded = Loaded([PixelValues(torch.ones(3, 2, 2))]).pin_memory()
    assert loaded.items[0].pixels.is_pinned()


def test_bad_worker_settings_are_refused(vpit, world):
    dataset = ConversationDataset(world / "r.jsonl", world / "img")
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        Loader(Mixture({"a": dataset}, {"a": 1.0}), vpit, 2, num_workers=-1)


def _torchrun(*args, **popen):
    cmd = torchrun_argv(SCRIPT, *args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_tree(pid):
    """SIGKILL ``pid`` and every process under it at once (torchrun starts each rank in a
    session of its own, so killing its process group leaves the ranks running)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += parents.get(p, [])
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return tree


def test_two_ranks_with_two_workers_killed_mid_epoch_resume_bit_identical(
    backbone, world, tmp_path
):
    """2 ranks (gloo) x 2 loader workers, sources of every kind (JSONL read whole and
    streamed, webdataset, parquet): SIGKILLed after step 4 of 12 (mid-epoch) and run again,
    the run ends with exactly the weights of an uninterrupted run that read in-process."""
    for kind in ("webdataset", "parquet"):
        args = ["data", "convert", "--to", kind, "--out", str(world / f"r-{kind}")]
        args += ["--image-root", str(world / "img"), "--shard-size", "5", str(world / "r.jsonl")]
        if not (world / f"r-{kind}").exists():
            assert cli(args) == 0
    straight = _torchrun(backbone, world, tmp_path / "a", 0, 0)
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err.decode()[-3000:]

    killed = _torchrun(backbone, world, tmp_path / "b", 2, 0.15)
    deadline = time.time() + 240
    while not (tmp_path / "b" / "step-0000004" / "config.json").exists():
        assert killed.poll() is None, killed.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    _kill_tree(killed.pid)  # torchrun, both ranks and their loader workers
    killed.wait()
    time.sleep(1.0)  # nothing of the killed run may write on
    assert not (tmp_path / "b" / "step-0000012").exists()

    resumed = _torchrun(backbone, world, tmp_path / "b", 2, 0)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-3000:]
    a = load_file(str(tmp_path / "a" / "step-0000012" / "weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "step-0000012" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((tmp_path / "b" / "run_info.json").read_text())
    assert 4 <= info["start_step"] < 12  # the second run resumed mid-way
    state = json.loads((tmp_path / "b" / "step-0000012" / "config.json").read_text())["data"]
    assert state["num_workers"] == 2
    streams = state["plan"]["streams"]
    assert set(streams) == {"w", "p", "s"}  # the streams' positions are in the checkpoint
