"""Demand per model name, as read, turned into the models the planner serves: names resolved through the catalog
(aliases add up), each model's minimum replicas from its entry."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from policies.catalog import ModelCatalog
from policies.colocation import ServedModel
from policies.model_load import ModelLoad


def served_models(
    loads: Mapping[str, ModelLoad], catalog: ModelCatalog, min_replicas: Mapping[str, int] | None = None
) -> tuple[list[ServedModel], list[np.ndarray], list[str]]:
    """The served models in name order, their request histories in the same order (aligned on their most recent
    steps; empty when none has one), and the names the catalog does not know. `min_replicas` overrides the
    catalog's floor, by any name of the model."""
    rates: dict[str, float] = {}
    histories: dict[str, np.ndarray] = {}
    unknown = []
    for name, load in loads.items():
        spec = catalog.model(name)
        if spec is None:
            unknown.append(name)
            continue
        rates[spec.name] = rates.get(spec.name, 0.0) + load.requests_per_second
        if len(load.history):
            seen = histories.get(spec.name)
            histories[spec.name] = load.history if seen is None else _add_aligned(seen, load.history)
    floors: dict[str, int] = {}
    for name, floor in (min_replicas or {}).items():
        spec = catalog.model(name)
        if spec is not None:
            floors[spec.name] = max(floors.get(spec.name, 0), floor)
    models = []
    for name in sorted(rates):
        spec = catalog.model(name)
        assert spec is not None
        models.append(ServedModel(spec, rates[name], floors.get(name, spec.min_replicas)))
    ordered = [histories.get(m.name, np.zeros(0)) for m in models]
    return models, (ordered if any(len(h) for h in ordered) else []), sorted(unknown)


def _add_aligned(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two rate histories summed over their common most recent steps."""
    n = min(len(a), len(b))
    return a[len(a) - n :] + b[len(b) - n :]
