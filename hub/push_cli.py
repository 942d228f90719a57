"""`lift push`: publish a bundle on the Hugging Face Hub (its files and a generated model card).

huggingface_hub is imported only inside :func:`run` (through :mod:`lift_serve.hub.push`), so
``lift --help`` works without it.
"""

from __future__ import annotations

import argparse

HELP = "publish a bundle on the Hugging Face Hub as a model repository, with a model card made from its manifest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle directory written by `lift export --out DIR`")
    parser.add_argument("repo", metavar="REPO", help="Hub model repository ORG/NAME; created if it does not exist")
    parser.add_argument("--revision", default=None, metavar="BRANCH",
                        help="branch to commit to, created if absent (default: the repository's main branch)")
    parser.add_argument("--private", action="store_true",
                        help="create the repository private (an existing repository keeps its visibility)")
    parser.add_argument("--message", default=None, metavar="TEXT",
                        help="commit message (default: names the backbone, upsampler, precision and densities)")


def push_and_report(bundle, repo: str, *, revision: str | None = None, private: bool = False,
                    message: str | None = None, after_export: bool = False) -> str:
    """Push with the token and endpoint from the environment (HF_TOKEN or `hf auth login`,
    HF_ENDPOINT) and print where it went; shared with `lift export --push-to-hub`, where a failed push
    says that the bundle itself was written and how to publish it later."""
    from lift_serve.hub.push import PushError, push_bundle

    print(f"publishing {bundle} to the Hub as {repo}{f' (branch {revision})' if revision else ''}")
    try:
        url = push_bundle(bundle, repo, revision=revision, private=private, commit_message=message)
    except PushError as exc:
        if not after_export:
            raise
        raise PushError(f"{exc}. The bundle itself is written at {bundle}: publish it later with "
                        f"`lift push {bundle} ORG/NAME`") from None
    print(f"published: {url}")
    print(f"serve it with: lift serve --bundle hf://{repo}{f'@{revision}' if revision else ''}")
    return url


def run(args: argparse.Namespace) -> int:
    push_and_report(args.bundle, args.repo, revision=args.revision, private=args.private, message=args.message)
    return 0
