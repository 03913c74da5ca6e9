"""MetaMorph serving: ``metamorph serve CHECKPOINT``, an OpenAI-compatible HTTP API (chat with
images in and out, streaming, image generation) that batches concurrent requests, with limits,
an optional API key and a chat page at ``/``. :func:`metamorph_serve.app.create_app` builds the
app for a loaded model."""

__version__ = "0.1.0"
