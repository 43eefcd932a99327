"""Settings classes as the command line sees them: a flag per field (its help the field's
docstring, its choices the field's Literal, a --no- form for a boolean), values checked by
pydantic against the fields' types, every problem on one line naming the flag, and settings
files (YAML or JSON) checked the same way. No torch here.

The settings classes: TrainConfig (config.py); EvalConfig, PredictConfig, PushConfig and the
train / cv flags (settings.py); ServeConfig (serve/settings.py, pydantic-settings).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from .errors import SoftpromptError

REQUIRED = dataclasses.MISSING
"""The default of a field that has none."""


def positional(**kw):
    """A dataclass field given on the command line by position (e.g. the adapter folder)."""
    return field(metadata={"positional": True}, **kw)


def required(**kw):
    """A dataclass field with a default only so that it may follow fields with defaults; the
    command line requires it."""
    return field(metadata={"required": True}, **kw)


@dataclass(frozen=True)
class Setting:
    """One field of a settings class, as the command line shows and checks it."""

    name: str
    type: Any
    """The field's type, with its constraints (`Annotated`) for a pydantic model's field."""
    default: Any
    doc: str
    positional: bool = False

    @property
    def flag(self) -> str:
        return self.name if self.positional else "--" + self.name.replace("_", "-")

    @property
    def base(self) -> Any:
        """The type without its constraints."""
        return get_args(self.type)[0] if get_origin(self.type) is Annotated else self.type

    @property
    def choices(self) -> tuple | None:
        """A Literal's values (also of an optional Literal)."""
        for t in (self.base, *get_args(self.base)):
            if get_origin(t) is Literal:
                return get_args(t)
        return None

    @property
    def is_list(self) -> bool:
        return get_origin(self.base) is list

    @property
    def nullable(self) -> bool:
        return type(None) in get_args(self.base)

    @property
    def type_name(self) -> str:
        return getattr(self.base, "__name__", None) or str(self.base).replace("typing.", "")


@cache
def settings_fields(cls) -> dict[str, Setting]:
    """The fields of a settings class: a dataclass (help from its attribute docstrings) or a
    pydantic model (from `use_attribute_docstrings`)."""
    if hasattr(cls, "model_fields"):
        return {
            name: Setting(
                name,
                Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation,
                REQUIRED if f.is_required() else f.get_default(call_default_factory=True),
                f.description or "",
            )
            for name, f in cls.model_fields.items()
        }
    hints, docs = typing.get_type_hints(cls), _attribute_docs(cls)
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not REQUIRED else f.default
        if f.metadata.get("required"):
            default = REQUIRED
        out[f.name] = Setting(
            f.name, hints[f.name], default, docs.get(f.name, ""), bool(f.metadata.get("positional"))
        )
    return out


def _attribute_docs(cls) -> dict[str, str]:
    """{field: the string literal right under it} for a class and the classes it extends."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):
            continue
        for stmt, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


WANTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "literal_error": "one of {expected}",
}
"""What a pydantic error type says was expected."""


def problem(setting: Setting, err: dict, name: str | None = None) -> str:
    """One pydantic error (its structured form, not its text) as a line naming the setting."""
    name = name or setting.flag
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "missing":
        return f"{name} is required"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        words = {"ge": "at least", "gt": "more than", "le": "at most", "lt": "less than"}
        op, bound = next((words[k], v) for k, v in ctx.items() if k in words)
        return f"{name} must be {op} {bound} (got {got})"
    if kind == "value_error":
        return f"{name}: {ctx.get('error', err['msg'])}"
    if kind in WANTED:
        in_file = not name.startswith("-")  # a settings file may say null; a flag cannot
        want = WANTED[kind].format(**ctx) + (" or null" if setting.nullable and in_file else "")
        return f"{name}: expected {want}, got {got}"
    return f"{name}: {err['msg']}"


def check(cls, values: dict[str, Any], key_style: bool = False) -> dict[str, Any]:
    """`values` (by field name) converted to their fields' types, or SoftpromptError with every
    problem on one line (`--epochs: expected an integer, got x`; `key_style`: `epochs: ...`)."""
    out, problems = _checked(cls, values, key_style)
    if problems:
        raise SoftpromptError("; ".join(problems))
    return out


def _checked(cls, values: dict[str, Any], key_style: bool = False) -> tuple[dict, list[str]]:
    from pydantic import TypeAdapter, ValidationError

    fields, out, problems = settings_fields(cls), {}, []
    for key, value in values.items():
        s = fields[key]
        try:
            out[key] = TypeAdapter(s.type).validate_python(value)
        except ValidationError as e:
            problems += [problem(s, err, key if key_style else None) for err in e.errors()]
    return out, problems


def build(cls, values: dict[str, Any]):
    """An instance of a dataclass settings class from the given values (checked), its other
    fields at their defaults; a missing required field is a problem naming its flag."""
    fields = settings_fields(cls).values()
    out, problems = _checked(cls, values)
    problems += [f"{s.flag} is required" for s in fields if s.default is REQUIRED and s.name not in values]  # fmt: skip
    if problems:
        raise SoftpromptError("; ".join(problems))
    return cls(**out)


# --------------------------------------------------------------------------- the parser


class Parser(argparse.ArgumentParser):
    """argparse whose errors (an invalid choice, a flag without its value) are SoftpromptError:
    one line, in argparse's words, which name the flag."""

    def error(self, message: str):
        raise SoftpromptError(message)


def settings_parser(command: str, classes: list, description: str, notes: dict | None = None):
    """A parser with a flag per field of the settings classes; only given flags are set."""
    p = Parser(
        prog=f"softprompt {command}", description=description, argument_default=argparse.SUPPRESS
    )
    for cls in classes:
        for s in settings_fields(cls).values():
            if s.name == "extra":
                continue
            default = "required" if s.default is REQUIRED else f"default: {s.default}"
            shown = "" if s.positional else f" (type: {s.type_name}, {default})"
            help_ = (s.doc + (notes or {}).get(s.name, "") + shown).replace("%", "%%")
            if s.positional:
                many = {"nargs": "*", "default": argparse.SUPPRESS} if s.is_list else {}
                p.add_argument(s.name, help=help_, **many)
            elif s.base is bool:
                p.add_argument(s.flag, action=argparse.BooleanOptionalAction, help=help_)
            elif s.choices:
                p.add_argument(s.flag, choices=s.choices, help=help_)
            else:
                action = "append" if s.is_list else "store"
                p.add_argument(s.flag, action=action, metavar=s.name.upper(), help=help_)
    return p


def parse(parser: Parser, argv: list[str]) -> dict:
    """The flags given (options and positionals in any order: `predict RUN --generate "x"`)."""
    given, unknown = parser.parse_known_intermixed_args(argv)
    if unknown:
        raise SoftpromptError(
            f"unrecognized arguments: {' '.join(unknown)} ({parser.prog} --help lists the flags)"
        )
    return vars(given)


def read_file(path: str, classes: tuple) -> tuple[dict, dict]:
    """The settings in a YAML or JSON file, keyed by field name (a key may use - or _), checked
    against the fields of `classes`: (the checked values, the keys no class has). A boolean
    must be true or false."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SoftpromptError("file not found") from None
    except OSError as e:
        raise SoftpromptError(f"cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise SoftpromptError("not a text file (UTF-8)") from None
    try:
        data = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SoftpromptError(f"not valid YAML or JSON ({at}{e.problem})") from None
    data = {} if data is None else data  # an empty file
    if not isinstance(data, dict):
        raise SoftpromptError(f"expected settings as key: value pairs, found a {type(data).__name__}")  # fmt: skip
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = {k: cls for cls in classes for k in settings_fields(cls)}
    other = {k: data.pop(k) for k in list(data) if k not in known}
    for key, value in data.items():
        if settings_fields(known[key])[key].base is bool and not isinstance(value, bool):
            raise SoftpromptError(f"{key}: expected true or false, got {value!r}")
    values = {}
    for cls in classes:
        values.update(check(cls, {k: v for k, v in data.items() if known[k] is cls}, True))
    return values, other


def unknown_key(key: str, known, command: str) -> SoftpromptError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return SoftpromptError(
        f"unknown key {key!r}; {hint}the keys are the flags' names with _ "
        f"(softprompt {command} --help lists them)"
    )
