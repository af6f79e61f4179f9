"""Searches over per-layer visual-token schedules (`core.schedule.LayerSchedule`) for any in-LLM method.

`schedules` holds the searches (G-Search, P-Sigmoid; arXiv 2412.00556) over a caller's
``evaluate(schedule) -> score``; `vlm` evaluates a schedule on the mini-LLaVA's calibration split
(``tokenreduce search-schedule``).
"""

from .schedules import SearchResult, g_search, p_sigmoid_keep, p_sigmoid_schedule, p_sigmoid_search

__all__ = ["SearchResult", "g_search", "p_sigmoid_keep", "p_sigmoid_schedule", "p_sigmoid_search"]
