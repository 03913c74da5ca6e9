"""Fixtures: the tiny trained unified model of metamorph_core.testing with a tiny sd-unet
decoder attached, served by a test client."""

from __future__ import annotations

import pytest
import torch

from metamorph_core import MetaMorphModel
from metamorph_core.testing import tiny_model_config
from metamorph_core.testing.fixtures import backbone_dirs, make_model  # noqa: F401
from metamorph_core.testing.trained import train


@pytest.fixture(scope="session")
def model(backbone_dirs):  # noqa: F811
    from metamorph_decoders.testing import tiny_decoder

    torch.manual_seed(0)
    model = train(MetaMorphModel.from_config(tiny_model_config(backbone_dirs["llama"])))
    sampling = {"scheduler": "ddim", "steps": 2, "guidance_scale": 1.0, "seed": 0}
    decoder = tiny_decoder(model, sampling=sampling)
    model.attach_decoder(decoder.eval())
    return model.eval()


@pytest.fixture
def serve(model):
    """``serve(**settings)``: a test client of a fresh app (engine included) for ``model``."""
    from fastapi.testclient import TestClient

    from metamorph_serve.app import create_app
    from metamorph_serve.settings import ServeSettings

    clients = []

    def make(**settings):
        client = TestClient(create_app(model, ServeSettings(**settings)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def live(model):
    """``live(**settings)``: the base URL of a real server (uvicorn on a free port, in a
    thread) for ``model``; stopped after the test."""
    import threading
    import time

    import uvicorn

    from metamorph_core.testing import free_port
    from metamorph_serve.app import create_app
    from metamorph_serve.settings import ServeSettings

    servers = []

    def start(**settings):
        port = free_port()
        config = uvicorn.Config(
            create_app(model, ServeSettings(**settings)), host="127.0.0.1", port=port,
            log_level="warning",
        )  # fmt: skip
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=30)
