"""Batched functional engine: fast weights with a task dim, inner loop, strategies."""

from pymeta.core.batched import STRATEGIES, StrategyPicker, TaskBatched
from pymeta.core.inner_loop import inner_loop

__all__ = ["STRATEGIES", "StrategyPicker", "TaskBatched", "inner_loop"]
