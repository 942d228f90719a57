"""Publishing a bundle as a Hugging Face Hub model repository: its files and a model card, in one commit.

The bundle is checked before anything is sent (a valid manifest, every graph it lists present and
matching its sha256), so a damaged or half-copied bundle never reaches the Hub, where ``lift serve
--bundle hf://...`` would only refuse it later. Exactly the files the manifest covers go up (the
manifest and its graphs), plus README.md generated from the manifest (:mod:`lift_serve.hub.card`),
sent from memory: the bundle directory is not modified. huggingface_hub's errors become
:class:`PushError` messages that name the repository and what to do.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from lift_serve.bundle import MANIFEST_NAME, BundleError, Manifest, read_manifest, sha256_file
from lift_serve.hub.card import model_card

# The Hub's repository names: letters, digits, '.', '_' and '-', starting with a letter or digit.
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")
CARD_NAME = "README.md"
_LOGIN = "log in with `hf auth login` or set HF_TOKEN to a token with write access"


class PushError(ValueError):
    """A bundle that cannot be published, or a Hub that refused it; the message says what to do."""

    user_facing = True


def check_repo_id(repo_id: str) -> str:
    """``ORG/NAME`` as the Hub spells repositories, else a PushError saying so."""
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id \
            or repo_id.endswith(".git"):
        raise PushError(f"repository {repo_id!r} is not ORG/NAME: give your user or organisation name and a model "
                        "name (letters, digits, '.', '_', '-'), e.g. my-org/dinov2-s14-uplift")
    return repo_id


def checked_bundle(bundle_dir: str | Path) -> tuple[Manifest, list[Path]]:
    """The bundle's manifest and the files to publish (manifest first), after checking every graph.

    The same checks as the service makes before loading (``service/ort_runtime.py``): each graph a
    plain file inside the bundle whose sha256 is the manifest's.
    """
    bundle_dir = Path(bundle_dir)
    try:
        manifest = read_manifest(bundle_dir)
    except BundleError as exc:
        raise PushError(f"not publishing {bundle_dir}: {exc}") from None
    files = [bundle_dir / MANIFEST_NAME]
    for role, graph in manifest.graph_files().items():
        path = bundle_dir / graph.file
        if path.is_symlink() or not path.is_file():
            raise PushError(f"not publishing {bundle_dir}: the {role} graph {graph.file} listed in the manifest is "
                            f"{'a link' if path.is_symlink() else 'missing'}; copy the whole bundle directory "
                            "(plain files) or re-export it with `lift export`")
        digest = sha256_file(path)
        if digest != graph.sha256:
            raise PushError(f"not publishing {bundle_dir}: {graph.file} has sha256 {digest[:12]}… but the manifest "
                            f"records {graph.sha256[:12]}…: the file is truncated, corrupted or from another export; "
                            "copy the bundle again or re-export it with `lift export`")
        files.append(path)
    return manifest, files


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures of whichever HTTP library this huggingface_hub uses: requests' (0.x) are
    OSErrors; httpx's (1.x) and httpx2's (2.x) are not."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _hub_error(exc: BaseException, repo_id: str, revision: str | None, endpoint: str, token: str | None) -> PushError:
    """A PushError for what huggingface_hub raised while publishing to ``repo_id``."""
    from huggingface_hub import errors, get_token

    if isinstance(exc, errors.LocalTokenNotFoundError):
        return PushError(f"no Hugging Face token to publish {repo_id} with; {_LOGIN}")
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return PushError(f"HF_HUB_OFFLINE is set, so {repo_id} cannot be published; unset it and try again")
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(exc, errors.HfHubHTTPError) and status is not None:
        if status == 401:
            found = "" if token or get_token() else " (no token was found)"
            return PushError(f"the Hub refused the credentials for {repo_id} (HTTP 401){found}; {_LOGIN}")
        if status == 403:
            return PushError(f"the token may not write to {repo_id} (HTTP 403): use a token with write access to "
                             f"'{repo_id.split('/')[0]}', or publish under a namespace you own; {_LOGIN}")
        if status == 404:
            what = f" or branch {revision!r}" if revision else ""
            return PushError(f"the Hub did not find {repo_id}{what} (HTTP 404): check the name ORG/NAME and that "
                             f"your token can see that namespace; {_LOGIN}")
        detail = (getattr(exc, "server_message", None) or str(exc)).strip().splitlines()[0][:300]
        return PushError(f"the Hub answered HTTP {status} while publishing {repo_id} ({detail}); check the "
                         "repository and try again later")
    return PushError(f"cannot reach the Hub at {endpoint} to publish {repo_id} ({type(exc).__name__}: "
                     f"{str(exc)[:200]}); check the network connection and HF_ENDPOINT, then try again")


def push_bundle(bundle_dir: str | Path, repo_id: str, *, revision: str | None = None, private: bool = False,
                token: str | None = None, commit_message: str | None = None, endpoint: str | None = None) -> str:
    """Publish the bundle at ``bundle_dir`` to the Hub model repository ``repo_id`` (created if absent).

    Args:
        revision: the branch to commit to (created if absent); None is the default branch.
        private: create the repository private (an existing repository keeps its visibility).
        token: a Hub token; None uses HF_TOKEN or the login stored by ``hf auth login``.
        commit_message: None says which bundle was uploaded.
        endpoint: the Hub's address; None is huggingface_hub's (``HF_ENDPOINT``, else huggingface.co).

    Returns:
        The URL of the commit.

    Raises:
        PushError: the bundle fails its checks (before any request), ``repo_id`` is not ORG/NAME, or
            the Hub refused or could not be reached.
    """
    check_repo_id(repo_id)
    manifest, files = checked_bundle(bundle_dir)
    from huggingface_hub import CommitOperationAdd, HfApi, errors

    card = model_card(manifest, repo_id).encode()
    operations = [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)) for path in files]
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card))
    for path in files:
        print(f"  {path.name:<26} {path.stat().st_size / 1e6:10.3f} MB")
    print(f"  {CARD_NAME:<26} {len(card) / 1e6:10.3f} MB (model card, generated)")
    if commit_message is None:
        upsampler = f" + {manifest.upsampler.kind}" if manifest.upsampler else ""
        commit_message = (f"lift-serve bundle: {manifest.backbone.timm_name}{upsampler}, {manifest.onnx.precision}, "
                          f"densities {sorted(manifest.iterations)}")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    except (errors.HfHubHTTPError, errors.LocalTokenNotFoundError, *_transport_errors()) as exc:
        raise _hub_error(exc, repo_id, revision, api.endpoint, token) from None
    return commit.commit_url
