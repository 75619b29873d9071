"""What a job costs per rank, by arithmetic alone (`cost_model`; ``tools/plan.py``,
``--dry-run``)."""

from engine.planning.cost_model import Plan, format_plan, plan

__all__ = ["Plan", "format_plan", "plan"]
