"""What one served model asks of the fleet: its request rate now and its recent history.

The record is independent of where it was learnt (vLLM's series in Prometheus, a trace file, a test), so the
co-location planner, the pre-warmer and their simulators read the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ModelLoad:
    """Demand for one model, as served under its `model_name` (vLLM's `--served-model-name`).

    `requests_per_second` is the rate the plan must carry (a recent peak or a forecast, as the reader chooses).
    `history` holds the request rate over equal steps, oldest first, for the correlation of models' peaks;
    empty when unknown. The token rates, queue and KV-cache use are what vLLM reports; zero when not known.
    """

    model: str
    requests_per_second: float
    prompt_tokens_per_second: float = 0.0
    generation_tokens_per_second: float = 0.0
    requests_waiting: float = 0.0
    kv_cache_usage: float = 0.0
    replicas_running: int = 0
    history: np.ndarray = field(default_factory=lambda: np.zeros(0), compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("a model load needs the model's name")
        if not np.isfinite(self.requests_per_second) or self.requests_per_second < 0:
            raise ValueError(f"{self.model}: requests per second must be a finite number >= 0")
