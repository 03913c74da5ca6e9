"""The Fréchet distance between two sets of images, in the feature space of the standard
InceptionV3 (FID) or of any registered MetaMorph vision encoder.

Each set is summarised by the mean ``mu`` and the covariance ``S`` of its feature vectors; the
distance is that of two Gaussians with those moments::

    d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

:class:`FeatureStats` accumulates the moments by streaming (a count, a sum and a sum of outer
products in float64, around a shift, the first batch's mean, for precision), so 30 000 images
are never held in memory; the covariance is the unbiased one (``n - 1``), as ``numpy.cov`` and
the reference FID implementations compute it.

``Tr((S_1 S_2)^(1/2))`` is computed two ways (:func:`frechet_distance`):

- ``"eigh"`` (default): ``S_1 S_2`` is similar to the symmetric positive semi-definite
  ``A = S_1^(1/2) S_2 S_1^(1/2)``, so the trace is the sum of the square roots of ``A``'s
  eigenvalues. Only symmetric eigen-decompositions are used: no complex numbers arise, and
  eigenvalues that rounding makes slightly negative are set to 0.
- ``"sqrtm"``: the convention of pytorch-fid and torchmetrics: ``scipy.linalg.sqrtm(S_1 S_2)``;
  if the result is not finite (singular product), ``eps`` is added to both diagonals and it is
  recomputed; rounding leaves tiny imaginary parts, which are dropped when those on the
  diagonal are below ``1e-3`` and are an error otherwise.

Both agree to rounding on well-conditioned covariances (a test checks it). The distance is
reported as its square, as FID is, clamped at 0 (rounding can make identical sets give -1e-12).

Feature spaces: :class:`InceptionFeatures` is the pool3 layer (2048 values) of the InceptionV3
that FID is defined with, built by torch-fidelity (the network torchmetrics' FID also uses,
here with TensorFlow-compatible resizing to 299x299, as the original FID), from weights given by
path; nothing is downloaded. :class:`EncoderFeatures` is any encoder of the registry
(``metamorph_core.create("encoder", name, **kwargs)``, e.g. ``siglip`` with
``pretrained=DIR``): an image's feature is the mean of its ``(num_tokens, hidden_size)`` tokens,
the encoder's own pooling-free summary (its tokens are what the model predicts; averaging them
is the same for every encoder and needs no extra head).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from metamorph_eval.generation.images import iter_image_batches
from metamorph_eval.runs import file_sha256

INCEPTION_REFUSAL = (
    "FID needs the standard InceptionV3 weights: pass --inception-weights PATH "
    "(pt_inception-2015-12-05 weights, e.g. torch-fidelity's "
    "weights-inception-2015-12-05-6726825d.pth, as a .pth state dict or .safetensors); "
    "nothing is downloaded"
)
METHODS = ("eigh", "sqrtm")


class FeatureStats:
    """Streaming mean and covariance of feature vectors of one dimension."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None
        self.sum: np.ndarray | None = None
        self.outer: np.ndarray | None = None

    def update(self, features: Any) -> FeatureStats:
        """Add a ``(b, d)`` batch of feature vectors (an array or a tensor)."""
        if hasattr(features, "detach"):
            features = features.detach().float().cpu().numpy()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be a (batch, dim) array, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features hold NaN or infinite values")
        if x.shape[0] == 0:
            return self
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.sum = np.zeros(x.shape[1])
            self.outer = np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != self.shift.shape[0]:
            raise ValueError(
                f"features of dimension {x.shape[1]} added to statistics of dimension "
                f"{self.shift.shape[0]}"
            )
        y = x - self.shift
        self.n += x.shape[0]
        self.sum += y.sum(axis=0)
        self.outer += y.T @ y
        return self

    @property
    def dim(self) -> int | None:
        return None if self.shift is None else int(self.shift.shape[0])

    @property
    def mean(self) -> np.ndarray:
        self._need(1)
        return self.shift + self.sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """The unbiased covariance (divided by ``n - 1``)."""
        self._need(2)
        centred = self.sum / self.n
        cov = (self.outer - self.n * np.outer(centred, centred)) / (self.n - 1)
        return (cov + cov.T) / 2

    def _need(self, k: int) -> None:
        if self.n < k:
            raise ValueError(
                f"these statistics hold {self.n} feature vector(s), {k} needed; the Fréchet "
                "distance needs at least 2 images per set"
            )

    def state(self) -> dict[str, np.ndarray]:
        """The accumulated sums as arrays (to save with ``numpy.savez``; no pickles)."""
        self._need(1)
        return {"n": np.array(self.n), "shift": self.shift, "sum": self.sum, "outer": self.outer}

    @classmethod
    def from_state(cls, state: Any) -> FeatureStats:
        """Statistics from :meth:`state`'s arrays (or a loaded ``.npz`` holding them)."""
        stats = cls()
        stats.n = int(state["n"])
        stats.shift = np.asarray(state["shift"], np.float64)
        stats.sum = np.asarray(state["sum"], np.float64)
        stats.outer = np.asarray(state["outer"], np.float64)
        return stats


def frechet_distance(
    mu1: np.ndarray,
    cov1: np.ndarray,
    mu2: np.ndarray,
    cov2: np.ndarray,
    *,
    method: str = "eigh",
    eps: float = 1e-6,
) -> float:
    """The squared Fréchet distance between the Gaussians ``N(mu1, cov1)`` and
    ``N(mu2, cov2)`` (see the module's docstring for ``method`` and ``eps``)."""
    from scipy import linalg

    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    cov1, cov2 = (
        np.atleast_2d(np.asarray(cov1, np.float64)),
        np.atleast_2d(np.asarray(cov2, np.float64)),
    )
    d = mu1.shape[0]
    if mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"shapes disagree: mu1 {mu1.shape}, cov1 {cov1.shape}, mu2 {mu2.shape}, cov2 "
            f"{cov2.shape}; expected ({d},) and ({d}, {d})"
        )
    if method == "eigh":
        w, v = linalg.eigh(cov1)
        root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        inner = root1 @ cov2 @ root1
        eig = linalg.eigvalsh((inner + inner.T) / 2)
        trace_root = float(np.sqrt(np.clip(eig, 0, None)).sum())
    elif method == "sqrtm":
        root = linalg.sqrtm(cov1 @ cov2)
        if not np.isfinite(root).all():
            offset = np.eye(d) * eps
            root = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
        if np.iscomplexobj(root):
            worst = float(np.abs(np.diagonal(root).imag).max())
            if worst > 1e-3:
                raise ValueError(
                    f"the matrix square root has an imaginary part of {worst:.3g} on its "
                    "diagonal (ill-conditioned covariances: too few images for the feature "
                    "dimension?); use method='eigh'"
                )
            root = root.real
        trace_root = float(np.trace(root))
    else:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_root)
    return max(value, 0.0)


def stats_distance(a: FeatureStats, b: FeatureStats, method: str = "eigh") -> float:
    """:func:`frechet_distance` of two accumulated feature sets."""
    if a.dim != b.dim:
        raise ValueError(f"feature dimensions differ: {a.dim} and {b.dim}")
    return frechet_distance(a.mean, a.cov, b.mean, b.cov, method=method)


class InceptionFeatures:
    """PIL images -> ``(b, 2048)`` pool3 features of FID's InceptionV3 (torch-fidelity's
    ``FeatureExtractorInceptionV3``: uint8 pixels, TensorFlow-compatible bilinear resize to
    299x299), from the weights at ``weights_path`` (a ``.pth`` state dict, checked with
    ``torch.load(weights_only=True)`` before torch-fidelity loads it, or ``.safetensors``).
    No weights path is an error saying how to give one: nothing is downloaded."""

    dim = 2048

    def __init__(self, weights_path: str | Path | None, device: str = "cpu") -> None:
        import torch

        if weights_path is None:
            raise ValueError(INCEPTION_REFUSAL)
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"--inception-weights '{path}': no such file")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            raise ImportError(
                "FID's InceptionV3 comes from torch-fidelity: pip install torch-fidelity"
            ) from e
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:  # refuse anything but tensors before torch-fidelity unpickles the file
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means: not a state dict we accept
            raise ValueError(
                f"--inception-weights '{path}' is not a state dict of tensors ({e}); "
                "pass the pt_inception-2015-12-05 weights as .pth or .safetensors"
            ) from e
        with _as_pth(path, state) as pth:
            try:
                net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(pth))
            except RuntimeError as e:  # load_state_dict: missing or misshapen weights
                raise ValueError(
                    f"--inception-weights '{path}' do not fit InceptionV3 ({str(e)[:300]})"
                ) from e
        self.net = net.to(device).eval()
        self.device = device
        self.identity = {
            "network": "inception-v3-compat pool3",
            "weights": str(path),
            "sha256": file_sha256(path),
        }

    def __call__(self, images: Sequence[Any]) -> np.ndarray:
        import torch

        out: list[np.ndarray | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):  # same-size images share a forward
            by_size.setdefault(img.size, []).append(i)
        with torch.no_grad():
            for idx in by_size.values():
                arrays = [np.asarray(images[i].convert("RGB"), dtype=np.uint8) for i in idx]
                x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(self.device)
                (features,) = self.net(x)
                for i, f in zip(idx, features.float().cpu().numpy(), strict=True):
                    out[i] = f
        return np.stack(out)


@contextmanager
def _as_pth(path: Path, state: dict[str, Any]) -> Iterator[Path]:
    """The path torch-fidelity loads: the user's ``.pth`` itself, or a temporary ``.pth`` of a
    ``.safetensors`` file's tensors (removed afterwards)."""
    if path.suffix != ".safetensors":
        yield path
        return
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "inception.pth"
        torch.save(state, target)
        yield target


class EncoderFeatures:
    """PIL images -> ``(b, hidden_size)``: the mean over tokens of a registered encoder's
    output (``create("encoder", name, **kwargs)``), in float32."""

    def __init__(
        self,
        name: str,
        kwargs: dict[str, Any] | None = None,
        device: str = "cpu",
        dtype: str | None = None,
    ) -> None:
        import torch

        from metamorph_core import create

        encoder = create("encoder", name, **(kwargs or {}))
        if dtype is not None:
            encoder = encoder.to(getattr(torch, dtype))
        self.encoder = encoder.to(device).eval()
        self.device = device
        self.dim = int(encoder.hidden_size)
        self.identity = {"encoder": name, "kwargs": kwargs or {}, "pooling": "mean of tokens"}

    def __call__(self, images: Sequence[Any]) -> np.ndarray:
        import torch

        from metamorph_core.pixels import move_pixels

        param = next(iter(self.encoder.parameters()), None)
        dtype = param.dtype if param is not None else torch.float32
        with torch.no_grad():
            pixels = move_pixels(self.encoder.preprocess(list(images)), self.device, dtype)
            tokens = self.encoder(pixels)
            return tokens.float().mean(dim=1).cpu().numpy()


def image_stats(
    paths: Sequence[Path],
    extract: Callable[[Sequence[Any]], np.ndarray],
    *,
    batch_size: int = 32,
    on_error: str = "raise",
    skipped: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> FeatureStats:
    """:class:`FeatureStats` of ``extract``'s features of the images at ``paths``, read and
    embedded ``batch_size`` at a time (unreadable files: see
    :func:`~metamorph_eval.generation.images.iter_image_batches`); ``progress(k)`` is called
    after each batch of ``k`` images."""
    stats = FeatureStats()
    for batch in iter_image_batches(paths, batch_size, on_error, skipped):
        stats.update(extract(batch))
        if progress is not None:
            progress(len(batch))
    return stats
