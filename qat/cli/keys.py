"""``qat keys``: every recipe key with its type, default and meaning, as Markdown (``docs/recipes.md``
is this output)."""

from __future__ import annotations


def run(args) -> int:
    from ..recipe import reference_markdown

    print(reference_markdown(), end="")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("keys", help="every recipe key with its type, default and meaning (Markdown)")
    p.set_defaults(func=run)
