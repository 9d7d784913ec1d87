"""Sweeps: one config entry that expands an experiment template over named axes (harmful ratio, method chain,
model, recipe, ...) into ordinary experiments with readable names, e.g. `mix_ratio0.1__random`.

An axis is either a list of values, which fill the template's `{axis}` placeholders and name the point
`<axis><value>`, or a mapping of names to overrides merged into the experiment (`methods` are appended to the
chain, other keys replaced), which name the point by their own name.
"""

from __future__ import annotations

import copy
import itertools
import re

PLACEHOLDER = re.compile(r"\{(\w+)\}")


def value_label(value) -> str:
    """How a value appears in an experiment name: 0.1 -> 0.1, 1e-4 -> 0.0001, 3 -> 3, True -> true."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, "g") if abs(value) >= 1e-4 or value == 0 else format(value, ".0e")
    return str(value)


def fill(obj, axis: str, value):
    """The template with `{axis}` replaced: a string that is only the placeholder takes the value itself (a number
    stays a number), a longer string gets its text."""
    if isinstance(obj, dict):
        return {k: fill(v, axis, value) for k, v in obj.items()}
    if isinstance(obj, list):
        return [fill(v, axis, value) for v in obj]
    if isinstance(obj, str):
        if obj == "{" + axis + "}":
            return value
        return obj.replace("{" + axis + "}", value_label(value))
    return obj


def merge(experiment: dict, overrides: dict) -> dict:
    out = dict(experiment)
    for key, value in overrides.items():
        if key == "methods":
            out["methods"] = list(out.get("methods", [])) + list(value)
        else:
            out[key] = value
    return out


def placeholders(obj) -> set[str]:
    if isinstance(obj, dict):
        return set().union(*(placeholders(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(placeholders(v) for v in obj)) if obj else set()
    return set(PLACEHOLDER.findall(obj)) if isinstance(obj, str) else set()


def sweep_points(name: str, spec: dict) -> list[tuple[str, dict, dict]]:
    """(experiment name, experiment, {axis: the point's value or name}) for every point of one sweep, in axis
    order (the first axis varies slowest)."""
    axes = spec["axes"]
    options = []
    for axis, values in axes.items():
        if isinstance(values, dict):
            options.append([(axis, label, label, overrides or {}) for label, overrides in values.items()])
        else:
            options.append([(axis, f"{axis}{value_label(v)}", v, None) for v in values])
    points = []
    for combo in itertools.product(*options):
        experiment = copy.deepcopy(spec["experiment"])
        labels, coords = [], {}
        for axis, label, value, overrides in combo:
            experiment = merge(experiment, overrides) if overrides is not None else fill(experiment, axis, value)
            labels.append(label)
            coords[axis] = value
        left = placeholders(experiment) & set(axes)
        if left:
            raise ValueError(f"sweeps.{name}: placeholder {{{sorted(left)[0]}}} left after expansion")
        points.append((f"{name}_{'__'.join(labels)}", experiment, coords))
    return points


def line_label(coords: dict, x_axis: str) -> str:
    """A point's line in a sweep's report: its values on every axis but the plotted one."""
    return " / ".join(str(v) for k, v in coords.items() if k != x_axis) or "all"


def expand_sweeps(sweeps: dict, experiments: dict) -> dict[str, dict]:
    """{experiment name: experiment} for every point of every sweep. A name that an experiment or another
    sweep point already has is an error naming both."""
    out = {}
    for name, spec in sweeps.items():
        for exp_name, experiment, _ in sweep_points(name, spec):
            if exp_name in experiments or exp_name in out:
                raise ValueError(f"sweeps.{name}: experiment {exp_name!r} exists already; rename the sweep or axis")
            out[exp_name] = experiment
    return out
