"""Growth of the pool and the repositories, for "days until full".

The agent adds a sample (time, bytes used) per store at most once per
SAMPLE_EVERY to <pool>/agent/usage.json (written atomically); the estimate is
the least-squares slope over the last WINDOW. No growth, or too few samples: None.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

SAMPLE_EVERY = 600.0
WINDOW = 7 * 86400.0
KEEP = 14 * 86400.0


def load(path: str) -> dict[str, list[list[float]]]:
    try:
        with open(path) as f:
            data = json.load(f)
        return {k: [list(map(float, s)) for s in v] for k, v in data.items() if isinstance(v, list)}
    except (OSError, ValueError, TypeError):
        return {}


def save(path: str, data: dict[str, list[list[float]]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".usage.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def add(data: dict[str, list[list[float]]], store: str, now: float, used: float) -> bool:
    samples = data.setdefault(store, [])
    if samples and now - samples[-1][0] < SAMPLE_EVERY:
        return False
    samples.append([now, float(used)])
    data[store] = [s for s in samples if s[0] >= now - KEEP]
    return True


def days_until_full(samples: list[list[float]], capacity: float | None, now: float) -> float | None:
    if not capacity:
        return None
    recent = np.array([s for s in samples if s[0] >= now - WINDOW], dtype=float)
    if len(recent) < 3 or recent[-1, 0] - recent[0, 0] < 3600:
        return None
    slope = np.polyfit(recent[:, 0] - recent[0, 0], recent[:, 1], 1)[0]   # bytes per second
    if slope <= 0:
        return None
    return max(0.0, (capacity - recent[-1, 1]) / slope / 86400.0)
