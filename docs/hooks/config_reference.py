"""MkDocs hook: the configuration reference, generated from the config models' own field descriptions.

A page holding the line `<!-- config-reference -->` gets, in its place, one table per config section
(key, type, default, description), read from `saekit.config.Config.model_fields`. Nothing here names a key:
a new field appears in the manual as soon as it has a description.
"""

from __future__ import annotations

import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

PLACEHOLDER = "<!-- config-reference -->"

# Document the code of this checkout (as mkdocstrings does with `paths: [src]`), not another installed copy.
SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def on_page_markdown(markdown: str, page: Any = None, config: Any = None, files: Any = None, **_: Any) -> str:
    if PLACEHOLDER not in markdown:
        return markdown
    return markdown.replace(PLACEHOLDER, render_reference())


def sections() -> dict[str, type]:
    """{section name: its pydantic model}, in the order `Config` declares them."""
    from saekit.config import Config

    return {name: field.annotation for name, field in Config.model_fields.items()}


def fields(model: type) -> dict[str, Any]:
    """{key: FieldInfo} of one section."""
    return dict(model.model_fields)


def render_reference() -> str:
    """Markdown: per section a heading, the section's docstring, and a table of its keys."""
    parts = []
    for section, model in sections().items():
        parts.append(f"## `{section}`\n")
        doc = _docstring(model)
        if doc:
            parts.append(_escape(doc) + "\n")
        parts.append("| key | type | default | description |\n|---|---|---|---|")
        for key, info in fields(model).items():
            parts.append(
                f"| `{section}.{key}` | {_code(type_name(info.annotation))} | {_code(default_text(info))} | "
                f"{_cell(info.description or '')} |"
            )
        parts.append("")
    return "\n".join(parts)


def type_name(annotation: Any) -> str:
    """A type as a YAML user reads it: `int`, `float | list[float]`, `"mean" | "sum"`, `str | null`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # a YAML list of any length
        return f"list[{type_name(args[0])}]"
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def default_text(info: Any) -> str:
    """The field's default as it would be written in YAML."""
    from pydantic_core import PydanticUndefined

    if info.default_factory is not None:
        return "(section defaults)"
    value = info.default
    if value is PydanticUndefined:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return str(list(value))
    return str(value)


def _docstring(model: type) -> str:
    doc = model.__doc__ or ""
    own = doc if doc != (model.__mro__[1].__doc__ or "") else ""
    return re.sub(r"\s+", " ", own).strip()


def _code(text: str) -> str:
    """A code span; Python-Markdown's tables do not split cells at a pipe inside one."""
    return f"`{text}`"


def _escape(text: str) -> str:
    """Markdown-escape prose outside `code spans` (descriptions hold |x|, k*B, prob_decay**i)."""
    pieces = text.split("`")
    for i in range(0, len(pieces), 2):
        escaped = re.sub(r"([\\*_\[\]|])", r"\\\1", pieces[i])
        pieces[i] = escaped.replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(pieces)


def _cell(text: str) -> str:
    return _escape(re.sub(r"\s+", " ", text).strip())
