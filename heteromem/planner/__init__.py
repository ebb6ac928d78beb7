"""`hm.plan`: whether a model trains on a machine, where its state would live, and a lower
bound on step time; `calibrate` measures the machine figures the bound uses."""

from heteromem.planner.figures import Figures, calibrate
from heteromem.planner.models import PRESETS, ModelSpec, describe_model
from heteromem.planner.plan import Plan, plan

__all__ = ["PRESETS", "Figures", "ModelSpec", "Plan", "calibrate", "describe_model", "plan"]
