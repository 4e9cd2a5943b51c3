"""Plans on disk: YAML that a person can read and edit, checked strictly on the way in.

Every way a plan file can be wrong (unreadable, not YAML, another schema version, a bad field)
becomes one QraError line that names the file and, for a bad field, its path (`layers[3].bits`).
"""

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from qra.errors import QraError
from qra.files import write_text
from qra.plans.schema import SCHEMA_VERSION, Plan

_MAX_VALUE_CHARS = 60


class _FlowMapping(dict):
    """A mapping that YAML writes on one line: one layer per line keeps long plans readable."""


class _PlanDumper(yaml.SafeDumper):
    """SafeDumper that writes `_FlowMapping`s in flow style and everything else in block style."""


_PlanDumper.add_representer(
    _FlowMapping, lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True)
)


def load_plan(path: str | Path) -> Plan:
    """Read and validate the plan at `path`; any problem is a QraError (exit 2) in one line."""
    data = _parse_yaml(_read_text(path), path)
    if not isinstance(data, dict):
        found = "nothing" if data is None else f"a {type(data).__name__}"
        raise QraError(f"{path} is not a qra plan: expected a mapping of plan fields, found {found}")
    _check_schema_version(data, path)
    try:
        return Plan.model_validate(data)
    except ValidationError as error:
        raise QraError(f"{path}: {describe_validation_error(error)}") from None


def dump_plan(plan: Plan) -> str:
    """The plan as YAML text: fields in schema order, one line per layer; `load_plan` reads it back equal."""
    data = plan.model_dump(mode="json")
    data["layers"] = [_layer_for_yaml(layer) for layer in data["layers"]]
    return yaml.dump(data, Dumper=_PlanDumper, sort_keys=False, default_flow_style=False, width=4096, allow_unicode=True)


def save_plan(plan: Plan, path: str | Path) -> None:
    """Write the plan to `path` atomically: a temporary file in the same directory, then a rename.

    The text is rendered before anything is written, and a failed write removes its temporary
    file, so an existing plan at `path` is either replaced whole or left untouched.
    """
    text = dump_plan(plan)
    try:
        write_text(Path(path), text)
    except OSError as error:
        raise QraError(f"cannot write plan {path}: {error.strerror or error}") from None


def describe_validation_error(error: ValidationError) -> str:
    """One line for the first problem pydantic found: the field's path, what is wrong, and the bad value."""
    problems = error.errors(include_url=False)
    first = problems[0]
    line = _problem_text(first)
    location = _location(first["loc"])
    if location:
        line = f"{location}: {line}"
    if len(problems) > 1:
        line += f" (and {len(problems) - 1} more {'problem' if len(problems) == 2 else 'problems'})"
    return line


def _read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QraError(f"plan file {path} does not exist") from None
    except UnicodeDecodeError:
        raise QraError(f"{path} is not a qra plan: it is not UTF-8 text") from None
    except OSError as error:
        raise QraError(f"cannot read plan {path}: {error.strerror or error}") from None


def _parse_yaml(text: str, path: str | Path) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise QraError(f"{path} is not valid YAML: {_yaml_problem(error)}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """`problem, line N` from a PyYAML error (lines counted from 1), without its multi-line excerpt."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return str(error).splitlines()[0]
    problem = error.problem or error.context or "cannot be parsed"
    mark = error.problem_mark or error.context_mark
    return f"{problem}, line {mark.line + 1}" if mark is not None else problem


def _check_schema_version(data: dict, path: str | Path) -> None:
    """Refuse another schema version before validating, so the message is about the version, not its fields."""
    if "schema_version" not in data:
        raise QraError(f"{path} has no schema_version; this qra reads schema_version {SCHEMA_VERSION}")
    version = data["schema_version"]
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise QraError(f"{path} has schema_version {version!r}; this qra reads schema_version {SCHEMA_VERSION}")


def _layer_for_yaml(layer: dict[str, Any]) -> _FlowMapping:
    """A layer on one line; overrides keep only the fields they set (unset ones inherit from the layer)."""
    modules = {name: {k: v for k, v in override.items() if v is not None} for name, override in layer["modules"].items()}
    return _FlowMapping({**layer, "modules": modules})


def _location(loc: tuple[int | str, ...]) -> str:
    """`('layers', 3, 'bits')` -> `layers[3].bits`; keys that are not plain names are quoted."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.isidentifier():
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text


def _problem_text(problem: dict[str, Any]) -> str:
    """What is wrong, lower-cased to follow the location, with the offending value where it helps."""
    kind = problem["type"]
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        return f"unknown field (got {_short_repr(problem['input'])})"
    error = problem.get("ctx", {}).get("error")
    if kind in ("value_error", "assertion_error") and error is not None:
        return str(error)
    message = problem["msg"]
    return f"{message[:1].lower()}{message[1:]} (got {_short_repr(problem['input'])})"


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else f"{text[: _MAX_VALUE_CHARS - 3]}..."
