"""Kept for scripts/real_model/fit.py, which imports this path: the objective is fit/distill.py."""

from .fit.distill import *  # noqa: F403
