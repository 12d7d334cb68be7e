"""The configuration reference (docs/reference.md), generated from the settings models:
every key with its type, default, environment variable and description (the field's
docstring). ``python scripts/config_reference.py`` writes it; ``--check`` exits 1 if
the file differs from what the models say (the tests run it), or a key has no
description.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import sys
import textwrap
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from idempotent_worker.config.routes import Route
from idempotent_worker.config.settings import Settings

TARGET = Path(__file__).resolve().parent.parent / "docs" / "reference.md"

HEAD = """# Configuration reference

Generated from the settings models by `scripts/config_reference.py` (the tests check
that it matches them). Every key can be set in the TOML file (`--config`, or
`WORKER_CONFIG`) or by its environment variable, which wins; tables and lists are given
to a variable as JSON. The [configuration page](configuration.md) explains them
together.
"""


def docstrings(model: type[BaseModel]) -> dict[str, str]:
    """The docstrings written under the fields of ``model`` and its bases."""
    found: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for field, after in itertools.pairwise(body):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(field.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                found[field.target.id] = " ".join(after.value.value.split())
    return found


def type_name(annotation: object) -> str:
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__
        )
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f'"{a}"' for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(named) + (" (optional)" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return "table"
    return str(annotation).replace("typing.", "")


def default_of(field: typing.Any) -> str:
    if field.is_required():
        return "required"
    value = field.default if field.default_factory is None else field.default_factory()
    if value is None or value is PydanticUndefined:
        return "unset"
    if isinstance(value, BaseModel):
        return "(table)"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`" if value != {} else "`{}`"


def rows(model: type[BaseModel], prefix: str, env: str) -> list[tuple[str, str, str, str, str]]:
    found = docstrings(model)
    out = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        annotation = field.annotation
        nested = annotation if isinstance(annotation, type) else None
        if nested is not None and issubclass(nested, BaseModel):
            out += rows(nested, f"{prefix}{key}.", f"{env}{key.upper()}__")
            continue
        description = found.get(name, "")
        out.append(
            (
                f"{prefix}{key}",
                type_name(annotation),
                default_of(field),
                f"{env}{key.upper()}",
                description,
            )
        )
    return out


def render() -> str:
    lines = [HEAD]
    settings = [r for r in rows(Settings, "", "WORKER_") if r[0] != "routes"]
    sections = [
        ("Settings", settings),
        ("Each route (`[[routes]]`, `WORKER_ROUTES` as JSON)", rows(Route, "routes[].", "")),
    ]
    for title, table in sections:
        lines += [
            f"## {title}",
            "",
            "| key | type | default | environment variable | meaning |",
            "|---|---|---|---|---|",
        ]
        for key, kind, default, variable, description in table:
            variable = f"`{variable}`" if variable else "(in `WORKER_ROUTES`)"
            lines.append(f"| `{key}` | {kind} | {default} | {variable} | {description} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    text = render()
    undocumented = [
        line.split("|")[1].strip() for line in text.splitlines() if line.endswith("|  |")
    ]
    if argv == ["--check"]:
        if undocumented:
            print(f"keys without a docstring: {', '.join(undocumented)}", file=sys.stderr)
            return 1
        if not TARGET.exists() or TARGET.read_text() != text:
            print(
                f"{TARGET} is out of date: run python scripts/config_reference.py", file=sys.stderr
            )
            return 1
        return 0
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(text)
    if undocumented:
        print(f"keys without a docstring: {', '.join(undocumented)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
