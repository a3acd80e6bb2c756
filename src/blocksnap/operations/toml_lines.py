"""Where a key sits in a TOML file, so a policy error can say `file:line`.

tomllib gives values without positions. This scans the text for table headers
(`[alerts]`, `[[volume]]` counted in order) and `key =` lines inside them; a key
of an inline table (`backup = { window = ... }`, possibly over several lines) is
looked for from its parent key's line onwards. An error in a value the scan
cannot place falls back to the nearest enclosing key or table.
"""
from __future__ import annotations

import re

_ARRAY = re.compile(r"^\s*\[\[\s*([A-Za-z0-9_.-]+)\s*\]\]")
_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")

Path = tuple[str | int, ...]


class LineMap:
    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.tables: list[tuple[Path, int, int]] = []    # path, first line index, end (exclusive)
        counts: dict[str, int] = {}
        starts: list[tuple[Path, int]] = [((), 0)]
        for i, raw in enumerate(self.lines):
            if m := _ARRAY.match(raw):
                name = m.group(1)
                n = counts.get(name, 0)
                counts[name] = n + 1
                starts.append((tuple(name.split(".")) + (n,), i))
            elif m := _TABLE.match(raw):
                starts.append((tuple(m.group(1).split(".")), i))
        for k, (path, first) in enumerate(starts):
            end = starts[k + 1][1] if k + 1 < len(starts) else len(self.lines)
            self.tables.append((path, first, end))

    def line(self, path: Path) -> int:
        """1-based line of the key at `path` (e.g. ('volume', 0, 'backup', 'window'))."""
        best: tuple[Path, int, int] = self.tables[0]
        for t in self.tables:
            if len(t[0]) <= len(path) and tuple(path[:len(t[0])]) == t[0] and len(t[0]) >= len(best[0]):
                best = t
        table, first, end = best
        rest = [p for p in path[len(table):] if isinstance(p, str)]
        at = first
        if not rest:
            return first + 1
        top = rest[0]
        for i in range(first, end):
            m = _KEY.match(self.lines[i])
            if m and m.group(1) == top:
                at = i
                break
        else:
            return first + 1
        for key in rest[1:]:
            pattern = re.compile(r"(^|[\s{,])" + re.escape(key) + r"\s*=")
            for i in range(at, end):
                if i > at and _KEY.match(self.lines[i]) and not pattern.search(self.lines[i]):
                    if _KEY.match(self.lines[i]).group(1) != key and not self.lines[i].startswith((" ", "\t")):
                        break
                if pattern.search(self.lines[i]):
                    at = i
                    break
        return at + 1
