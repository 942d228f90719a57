"""``hf://ORG/NAME[@REVISION][/PATH]``: a file or folder on the Hugging Face Hub wherever a local path
is accepted (``--checkpoint``, ``--backbone-weights``, ``--bundle`` / ``LIFT_BUNDLE``).

Resolution goes through ``huggingface_hub`` (its cache, revisions, ``HF_TOKEN`` / the stored login,
``HF_ENDPOINT``, ``HF_HOME`` / ``HF_HUB_CACHE``), so a file is downloaded once and every later use reads
the cache. What is resolved is then loaded by the same code as a local path, with the same checks
(our checkpoints' sidecar sha256, a bundle manifest's graph sha256s).

Offline: with ``HF_HUB_OFFLINE=1``, or when the Hub does not answer one quick probe, only the cache is
used, and a reference the cache cannot satisfy fails at once with the repository, revision and file
it needed and how to bring them (instead of the library's retries, about 25 s and more per file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
from pathlib import Path

SCHEME = "hf://"
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REF = re.compile(rf"hf://(?P<org>{_NAME})/(?P<name>{_NAME})(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._-]{{0,99}}))?"
                  r"(?:/(?P<path>[^\s]*))?")
# One probe of the Hub before a lookup that is not in offline mode: an unreachable Hub makes
# huggingface_hub retry each file for about 25 s; this answers in PROBE_TIMEOUT_S at most.
PROBE_TIMEOUT_S = 3.0


class HubError(RuntimeError):
    """A Hub reference that cannot be resolved; the message names it and says what to do.

    Not a ValueError on purpose: settings validators (pydantic) let it through unchanged.
    """

    user_facing = True


@dataclasses.dataclass(frozen=True)
class HubRef:
    """A parsed ``hf://`` reference; ``path`` is "" for the repository's root."""

    repo_id: str
    revision: str | None
    path: str

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"{SCHEME}{self.repo_id}{at}{'/' + self.path if self.path else ''}"

    @property
    def revision_or_main(self) -> str:
        return self.revision or "main"


def is_hub_ref(value) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


def parse_hub_ref(value: str) -> HubRef:
    found = _REF.fullmatch(value.strip())
    path = (found.group("path") or "").strip("/") if found else ""
    if found is None or any(part in ("", ".", "..") for part in path.split("/") if path):
        raise HubError(f"{value[:200]!r} is not a Hub reference; write hf://ORG/NAME[@REVISION][/PATH], e.g. "
                       "hf://UPLiFT-upsampler/uplift_dinov2-s14/uplift_dinov2-s14.safetensors")
    return HubRef(f"{found.group('org')}/{found.group('name')}", found.group("revision"), path)


# -- offline detection ---------------------------------------------------------------------------------
def _offline_by_setting() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=4)
def _hub_answers(endpoint: str) -> bool:
    import httpx

    try:
        httpx.head(endpoint, timeout=PROBE_TIMEOUT_S, follow_redirects=False)
    except httpx.HTTPError:
        return False
    return True


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _local_only() -> bool:
    return _offline_by_setting() or not _hub_answers(_endpoint())


@contextlib.contextmanager
def cache_only_when_unreachable():
    """For libraries that download through huggingface_hub themselves (timm's pretrained weights):
    while the Hub does not answer, run them in huggingface_hub's offline mode, so that a cached
    file is used and a missing one fails at once instead of after the library's retries."""
    from huggingface_hub import constants

    if not _local_only():
        yield False
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE = before


# -- the cache, for errors that say exactly what is missing --------------------------------------------
def _cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def _cached_repo(ref: HubRef) -> Path:
    return _cache_dir() / f"models--{ref.repo_id.replace('/', '--')}"


def _cached_revisions(ref: HubRef) -> list[str]:
    repo = _cached_repo(ref)
    names = [p.name for p in (repo / "refs").glob("*") if p.is_file()]
    return sorted(names) + sorted(p.name[:12] for p in (repo / "snapshots").glob("*") if p.is_dir())


def _cached_snapshot(ref: HubRef) -> Path | None:
    repo = _cached_repo(ref)
    ref_file = repo / "refs" / ref.revision_or_main
    commit = ref_file.read_text().strip() if ref_file.is_file() else ref.revision_or_main
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _why_not_cached(ref: HubRef, wanted: str, reason: str) -> HubError:
    repo = _cached_repo(ref)
    copy = (f"on a machine with internet run `hf download {ref.repo_id}"
            f"{' ' + ref.path if ref.path else ''}{' --revision ' + ref.revision if ref.revision else ''}` and copy "
            f"its cache folder {repo.name} into {_cache_dir()} (or pass a local path instead)")
    if not repo.is_dir():
        return HubError(f"{ref}: {reason}, and the Hugging Face cache ({_cache_dir()}) has no copy of "
                        f"{ref.repo_id}; {copy}")
    snapshot = _cached_snapshot(ref)
    if snapshot is None:
        cached = ", ".join(_cached_revisions(ref)) or "none"
        return HubError(f"{ref}: {reason}, and revision {ref.revision_or_main!r} of {ref.repo_id} is not in the "
                        f"cache (cached revisions: {cached}); {copy}")
    return HubError(f"{ref}: {reason}, and the cached revision {ref.revision_or_main!r} of {ref.repo_id} has no "
                    f"{wanted}; {copy}")


def _offline_reason() -> str:
    return "HF_HUB_OFFLINE is set" if _offline_by_setting() else f"the Hub ({_endpoint()}) does not answer"


def _online_error(ref: HubRef, exc: Exception, wanted: str) -> HubError:
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return HubError(f"{ref}: {ref.repo_id} is gated; accept its terms on the Hub and log in (`hf auth login` "
                        "or HF_TOKEN)")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return HubError(f"{ref}: repository {ref.repo_id} does not exist on the Hub or is private (log in with "
                        "`hf auth login` or set HF_TOKEN); check the name")
    if isinstance(exc, errors.RevisionNotFoundError):
        return HubError(f"{ref}: {ref.repo_id} has no revision {ref.revision_or_main!r} (a branch, tag or commit)")
    if isinstance(exc, errors.LocalEntryNotFoundError):  # (a subclass of EntryNotFoundError)
        return _why_not_cached(ref, wanted, "the Hub could not be reached")
    if isinstance(exc, errors.EntryNotFoundError):
        return HubError(f"{ref}: revision {ref.revision_or_main!r} of {ref.repo_id} has no {wanted}")
    return HubError(f"{ref}: the Hub refused the download ({type(exc).__name__}: {str(exc)[:200]})")


def _remote_missing() -> type[Exception]:
    """The error for a file the Hub says is not there (not a cache miss, which subclasses the same base)."""
    from huggingface_hub import errors

    return getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)


# -- resolution ----------------------------------------------------------------------------------------
def resolve_file(value: str | Path, sidecar: bool = False) -> Path:
    """A local path for ``value``: itself unless it is an ``hf://`` reference to a file, which is
    fetched into (or found in) the Hugging Face cache. ``sidecar``: for a ``.safetensors`` file, also
    fetch the ``.json`` beside it when the repository has one (our checkpoints' metadata), so the
    cached pair reads as a local checkpoint."""
    if not is_hub_ref(value):
        return Path(value).expanduser()
    ref = parse_hub_ref(str(value))
    if not ref.path:
        raise HubError(f"{ref} names a repository, but a file is needed here: add its path, e.g. {ref}/model.pth")
    path = _download(ref)
    if sidecar and ref.path.endswith(".safetensors"):
        _download(dataclasses.replace(ref, path=ref.path[: -len(".safetensors")] + ".json"), missing_ok=True)
    return path


def _download(ref: HubRef, missing_ok: bool = False) -> Path | None:
    from huggingface_hub import hf_hub_download

    local_only = _local_only()
    if local_only:
        snapshot = _cached_snapshot(ref)
        if snapshot is not None and not (snapshot / ref.path).is_file() and missing_ok:
            return None
        if snapshot is None or not (snapshot / ref.path).is_file():
            raise _why_not_cached(ref, f"file {ref.path}", _offline_reason())
    try:
        return Path(hf_hub_download(ref.repo_id, ref.path, revision=ref.revision, local_files_only=local_only,
                                    cache_dir=_cache_dir()))
    except _remote_missing() as exc:
        if missing_ok:
            return None
        raise _online_error(ref, exc, f"file {ref.path}") from None
    except Exception as exc:  # huggingface_hub's errors, named in _online_error
        raise _online_error(ref, exc, f"file {ref.path}") from None


def resolve_directory(value: str | Path) -> Path:
    """A local directory for ``value``: itself unless it is an ``hf://`` reference, whose folder (the
    repository's root without a path) is fetched into (or found in) the Hugging Face cache."""
    if not is_hub_ref(value):
        return Path(value).expanduser()
    from huggingface_hub import snapshot_download

    ref = parse_hub_ref(str(value))
    wanted = f"folder {ref.path}" if ref.path else "files"
    local_only = _local_only()
    if local_only:
        snapshot = _cached_snapshot(ref)
        if snapshot is None or not (snapshot / ref.path).is_dir():
            raise _why_not_cached(ref, wanted, _offline_reason())
    try:
        root = snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=local_only,
                                 cache_dir=_cache_dir(), allow_patterns=[f"{ref.path}/*"] if ref.path else None)
    except Exception as exc:  # huggingface_hub's errors, named in _online_error
        raise _online_error(ref, exc, wanted) from None
    folder = Path(root) / ref.path
    if not folder.is_dir():
        raise HubError(f"{ref}: revision {ref.revision_or_main!r} of {ref.repo_id} has no {wanted}")
    return folder
