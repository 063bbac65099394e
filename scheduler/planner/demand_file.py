"""A demand file: each model's request rate (and optionally its replica floor), as a person writes it.

A CSV (`model,requests_per_second[,min_replicas]`, header optional) or a YAML mapping model -> rps (or model ->
{requests_per_second, min_replicas}); the suffix decides, else the content. `gpu-extender plan --demand` and the
extender's planner (`serve --plan-demand`, re-read every round, so a mounted ConfigMap can change it) read it.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policies.model_load import ModelLoad

__all__ = ["Want", "read_demand_file", "wants_as_loads"]


@dataclass
class Want:
    """One model's demand as read, before the catalog names it: rates of aliases of one model add up."""

    name: str
    requests_per_second: float
    min_replicas: int | None = None


def read_demand_file(path: str | Path) -> list[Want]:
    """Raises OSError, UnicodeDecodeError or ValueError (naming the line or model) on a file it cannot use."""
    text = Path(path).read_text(encoding="utf-8-sig")
    suffix = Path(path).suffix.lower()
    if suffix in (".yaml", ".yml", ".json"):
        return _yaml_wants(text)
    if suffix != ".csv":
        import yaml

        try:
            if isinstance(yaml.safe_load(text), dict):
                return _yaml_wants(text)
        except yaml.YAMLError:
            pass
    return _csv_wants(text)


def wants_as_loads(wants: list[Want]) -> tuple[dict[str, ModelLoad], dict[str, int]]:
    """The demand as `ModelLoad`s by name (a name listed twice adds up), and the replica floors it sets."""
    rates: dict[str, float] = {}
    floors: dict[str, int] = {}
    for want in wants:
        rates[want.name] = rates.get(want.name, 0.0) + want.requests_per_second
        if want.min_replicas is not None:
            floors[want.name] = max(floors.get(want.name, 0), want.min_replicas)
    return {name: ModelLoad(name, rate) for name, rate in rates.items()}, floors


def _rate(value: Any, where: str) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = math.nan
    if not math.isfinite(rate) or rate < 0:
        raise ValueError(f"{where}: requests per second {value!r} is not a number >= 0")
    return rate


def _replicas(value: Any, where: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        count = int(str(value).strip())
    except ValueError:
        count = -1
    if count < 0:
        raise ValueError(f"{where}: min_replicas {value!r} is not a whole number >= 0")
    return count


def _csv_wants(text: str) -> list[Want]:
    wants: list[Want] = []
    reader = csv.reader(text.splitlines(), skipinitialspace=True)
    for row in reader:
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#") or (not wants and cells[0].lower() == "model"):
            continue
        where = f"line {reader.line_num}"
        if len(cells) not in (2, 3) or not cells[0]:
            raise ValueError(f"{where}: expected model,requests_per_second[,min_replicas], got {row!r}")
        replicas = _replicas(cells[2], where) if len(cells) == 3 else None
        wants.append(Want(cells[0], _rate(cells[1], where), replicas))
    return wants


def _yaml_wants(text: str) -> list[Want]:
    import yaml

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError("expected a mapping of model name to requests per second")
    wants = []
    for name, value in document.items():
        where = f"model {name!r}"
        if isinstance(value, dict):
            unknown = set(value) - {"requests_per_second", "min_replicas"}
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {', '.join(map(str, sorted(unknown)))}")
            wants.append(
                Want(
                    str(name),
                    _rate(value.get("requests_per_second"), where),
                    _replicas(value.get("min_replicas"), where),
                )
            )
        else:
            wants.append(Want(str(name), _rate(value, where)))
    return wants
