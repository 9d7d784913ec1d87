"""Training-data methods as plug-ins: check a config step against its method's own schema
(`schemas/methods/<name>.schema.yaml`) and turn a step's options into the method's options dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Iterable
from pathlib import Path

import yaml

SCHEMA_SUFFIX = ".schema.yaml"


def method_schemas(folder: str | Path) -> dict[str, dict]:
    """{method name: JSON schema of one step} for every `<name>.schema.yaml` in `folder`."""
    return {p.name.removesuffix(SCHEMA_SUFFIX): yaml.safe_load(p.read_text(encoding="utf-8"))
            for p in sorted(Path(folder).glob("*" + SCHEMA_SUFFIX))}


def step_problem(step: dict, where: str, schemas: dict[str, dict]) -> str | None:
    """What is wrong with one method step, as one line starting with `where` (e.g.
    `experiments.x.methods[0]`), or None when the step is valid."""
    import jsonschema  # snakemake depends on it; imported here so the options helpers below stay light

    name = step.get("method")
    if name not in schemas:
        return f"{where}: unknown method {name!r}; available: {', '.join(sorted(schemas))}"
    schema = schemas[name]
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(step))
    if error is None:
        return None
    path = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    # jsonschema's own wording for these two does not say which method or how to fix it.
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {})
        unknown = [k for k in error.instance if k not in known]
        return f"{path}: {name} has no option {unknown[0]!r}; options: {', '.join(k for k in known if k != 'method')}"
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        return f"{path}: {name} needs option {missing[0]!r}"
    return f"{path}: {error.message}"


def llm_options(schema: dict) -> list[str]:
    """The options of a method that name an entry of config `llms:` (`format: llm` in its schema): the workflow
    checks those names and hands the job the entry itself, as a dict of workflow_scripts.llm.Endpoint fields."""
    return [k for k, p in schema.get("properties", {}).items() if isinstance(p, dict) and p.get("format") == "llm"]


def names_in_steps(steps: Iterable[dict], names: Iterable[str]) -> list[str]:
    """The option values of `steps` (strings, or strings in a list) that are among `names`, in order of first
    use: the models and datasets a step refers to by name, whatever the option is called."""
    names, found = set(names), {}
    for step in steps:
        for key, value in step.items():
            for v in value if isinstance(value, list) else [value]:
                if key != "method" and isinstance(v, str) and v in names:
                    found.setdefault(v)
    return list(found)


def step_owners(experiments: dict[str, dict]) -> dict[tuple[str, int], str]:
    """{(experiment, step number from 1): the experiment whose folder holds that step's files}. Two experiments
    share a step when they share its whole input: the base model, the training set and every step up to it with
    the same options. The step is then made once, under the first of them in config order (demo_seal_safeinstr
    reads demo_seal's SEAL selection; every point of a mix sweep at one ratio reads one mix)."""
    first: dict[str, str] = {}
    owners = {}
    for name, x in experiments.items():
        steps = x.get("methods") or []
        for i in range(1, len(steps) + 1):
            key = json.dumps([x.get("model"), x.get("train"), steps[:i]], sort_keys=True, default=str)
            owners[name, i] = first.setdefault(key, name)
    return owners


def _number_types(hint) -> tuple:
    return typing.get_args(hint) or (hint,)


def option_type(cls, name: str) -> type:
    """The type of an options field without None (`float | None` -> float): what its command-line flag parses."""
    return next(t for t in _number_types(typing.get_type_hints(cls)[name]) if t is not type(None))


def parse_options(cls, options: dict, method: str):
    """The options dataclass `cls` built from a step's options (without `method`); the dataclass's defaults fill
    what is not given. An unknown or missing option is a ValueError naming the method and the option."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in options if k not in fields]
    if unknown:
        raise ValueError(f"{method} has no option {unknown[0]!r}; options: {', '.join(fields)}")
    missing = [name for name, f in fields.items() if name not in options
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{method} needs option {missing[0]!r}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in options.items():
        # JSON has one number type: 0 given for a float option is 0.0, as its command-line flag would give.
        if type(value) is int and float in _number_types(hints[key]) and int not in _number_types(hints[key]):
            value = float(value)
        values[key] = value
    return cls(**values)


def options_from_cli(cls, method: str, options_json: str | None, flags: dict):
    """`parse_options` of the `--options` JSON object, with options given as their own flags on top."""
    data = json.loads(options_json) if options_json else {}
    if not isinstance(data, dict):
        raise ValueError(f"--options must be a JSON object, got {options_json!r}")
    return parse_options(cls, {**data, **flags}, method)


def step_cli(cls, method: str, description: str | None, argv=None, extra=None) -> argparse.Namespace:
    """The command line every method step shares: --input, --output, --decisions and --options (the step's JSON,
    parsed into `cls` as `args.options`; a bad option is a usage error naming it). `extra(parser)` adds the
    method's own flags."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--input", required=True, help="the previous step's table, or the raw training set")
    p.add_argument("--output", required=True)
    p.add_argument("--decisions", required=True)
    p.add_argument("--options", help="the step's options as one JSON object")
    if extra:
        extra(p)
    args = p.parse_args(argv)
    try:
        args.options = options_from_cli(cls, method, args.options, {})
    except ValueError as e:
        p.error(str(e))
    return args
