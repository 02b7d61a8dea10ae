"""Bounded caches: the host path keeps plans, runners and replays keyed by shapes and
signatures, and a dynamic-shape workload would grow any of them forever."""
from __future__ import annotations


def keep(cache: dict, limit: int, key, value):
    """cache[key] = value, the oldest entry dropped past limit; returns value."""
    if len(cache) >= limit:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value
