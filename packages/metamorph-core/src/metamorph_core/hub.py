"""The Hugging Face Hub: a pretrained source named by a local directory or a Hub repo id
(``org/name``) becomes a local directory (:func:`resolve_pretrained`), and a saved checkpoint
directory becomes a commit on the Hub (:func:`upload_checkpoint`).

``huggingface_hub`` is an optional dependency (``pip install 'metamorph-core[hub]'``), imported
only when a Hub id is resolved or something is uploaded. A local path that exists always wins
over a Hub id of the same spelling. Downloads go through ``huggingface_hub.snapshot_download``
into its cache; with ``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` nothing is fetched and
the cached snapshot is used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metamorph_core.errors import CheckpointError

INSTALL_HINT = "pip install 'metamorph-core[hub]'"
# huggingface_hub's rules: "name" or "namespace/name", [A-Za-z0-9_.-], at most 96 characters a
# part, no "--" or "..", not starting or ending with "-" or "."
_PART = r"(?![.-])[\w.-]{1,96}(?<![.-])"
_REPO_ID = re.compile(rf"{_PART}(/{_PART})?", re.ASCII)


def is_repo_id(name: str | Path) -> bool:
    """Whether ``name`` is spelled like a Hub model repo id (``name`` or ``org/name``); a
    :class:`~pathlib.Path` never is."""
    if not isinstance(name, str) or not _REPO_ID.fullmatch(name):
        return False
    return "--" not in name and ".." not in name and not name.endswith(".git")


def is_hub_id(name: str | Path) -> bool:
    """Whether ``name`` names a Hub repo here: spelled like a repo id and not an existing local
    path (which would win)."""
    return is_repo_id(name) and not Path(name).exists()


def import_hub() -> Any:
    """The ``huggingface_hub`` module, or an ``ImportError`` saying how to install it."""
    try:
        import huggingface_hub
    except ImportError as e:
        raise ImportError(
            f"reading from or writing to the Hugging Face Hub needs huggingface_hub, which "
            f"metamorph-core does not install by default: {INSTALL_HINT}"
        ) from e
    return huggingface_hub


def resolve_pretrained(
    name_or_path: str | Path,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    allow_patterns: Sequence[str] | None = None,
    token: str | bool | None = None,
    what: str = "pretrained",
) -> Path:
    """The local directory of ``name_or_path`` (joined with ``subfolder`` when given).

    An existing local path is returned as it is (``revision``, ``cache_dir`` and the rest apply
    to Hub ids only). A Hub repo id is fetched with ``huggingface_hub.snapshot_download`` at
    ``revision`` (default ``main``) into ``cache_dir`` (default the Hub cache, ``HF_HUB_CACHE``);
    ``allow_patterns`` limits the files fetched (relative to ``subfolder``). With
    ``local_files_only=True`` or ``HF_HUB_OFFLINE=1`` only the cache is read. Anything else is a
    :class:`~metamorph_core.errors.CheckpointError` that names ``what`` (e.g. ``"checkpoint"``),
    what was tried and the fix.
    """
    shown = f"{what} '{name_or_path}'"
    local = Path(name_or_path).expanduser()
    if local.exists():
        return _subfolder(local, subfolder, shown)
    if not is_repo_id(name_or_path):
        raise CheckpointError(
            f"{shown}: there is no local directory '{local.absolute()}', and it is not a Hugging "
            "Face Hub repo id either (those look like 'org/name'); check the path, or give the "
            "repo id"
        )
    hub = import_hub_for(name_or_path, what)
    patterns = None
    if allow_patterns is not None:
        patterns = [f"{subfolder}/{p}" if subfolder else p for p in allow_patterns]
    elif subfolder:
        patterns = [f"{subfolder}/*"]
    try:
        snapshot = hub.snapshot_download(
            str(name_or_path),
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            local_files_only=bool(local_files_only),
            allow_patterns=patterns,
            token=token,
        )
    except Exception as e:
        raise _download_error(e, str(name_or_path), shown, revision, cache_dir) from e
    return _subfolder(Path(snapshot), subfolder, f"{shown} (Hub snapshot {snapshot})")


def import_hub_for(name: str | Path, what: str) -> Any:
    """:func:`import_hub`, its error saying that ``name`` was read as a Hub id."""
    try:
        return import_hub()
    except ImportError as e:
        raise ImportError(
            f"{what} '{name}': there is no local directory '{Path(name).absolute()}', so it is "
            f"read as a Hugging Face Hub repo id, which needs huggingface_hub: {INSTALL_HINT} "
            "(or, if it is a local path, check it)"
        ) from e


def _subfolder(root: Path, subfolder: str | None, shown: str) -> Path:
    if not subfolder:
        return root
    path = root / subfolder
    if not path.is_dir():
        raise CheckpointError(f"{shown} has no subfolder '{subfolder}/'; check subfolder=")
    return path


def _download_error(
    error: Exception,
    repo_id: str,
    shown: str,
    revision: str | None,
    cache_dir: str | Path | None,
) -> Exception:
    from huggingface_hub import constants, errors

    at = f"revision '{revision or 'main'}'"
    local = (
        f"there is no local directory '{Path(repo_id).absolute()}', so it was read as a Hub repo id"
    )
    if isinstance(error, errors.GatedRepoError):
        return CheckpointError(
            f"{shown}: the Hub repo is gated; accept its terms on huggingface.co and log in "
            "(hf auth login) or pass token="
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        return CheckpointError(
            f"{shown}: {local}, and the Hub has no model repo '{repo_id}' (or it is private: "
            "log in or pass token=); check the name, or give an existing local directory"
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return CheckpointError(
            f"{shown}: the Hub repo has no {at}; pass an existing branch, tag or commit as "
            "revision="
        )
    if isinstance(error, errors.LocalEntryNotFoundError):
        cache = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
        return CheckpointError(
            f"{shown}: {local}, and the Hub cache '{cache}' holds no complete snapshot of it at "
            f"{at} while the Hub cannot be reached (offline: HF_HUB_OFFLINE=1 or "
            "local_files_only=True, or no network); if it is a local path, check it (relative "
            f"paths start at the working directory), else download it once online (hf download "
            f"{repo_id}) or pass cache_dir= where it is cached"
        )
    if isinstance(error, (errors.HfHubHTTPError, OSError, ValueError)):
        return CheckpointError(f"{shown}: {local}, and fetching it from the Hub failed: {error}")
    return error


def upload_checkpoint(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    replace_patterns: Sequence[str] = (),
) -> Any:
    """Upload the checkpoint directory ``folder`` to the model repo ``repo_id`` (created if
    missing, ``private`` as given) on branch ``revision`` (created from ``main`` if missing) in
    one commit. Remote files matching ``replace_patterns`` that the checkpoint does not hold are
    deleted in that commit (files of an earlier checkpoint); other files stay. Returns
    ``huggingface_hub``'s ``CommitInfo``."""
    hub = import_hub()
    api = hub.HfApi(token=token)
    url = api.create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model")
    repo_id = getattr(url, "repo_id", None) or repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        repo_type="model",
        revision=revision,
        token=token,
        commit_message=commit_message or "Upload MetaMorph model",
        delete_patterns=list(replace_patterns) or None,
    )
