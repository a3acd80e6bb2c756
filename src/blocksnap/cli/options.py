"""Click parameter types that turn bad input into one clear usage error."""
from __future__ import annotations

import click

from ..errors import InvalidArgument
from ..units import parse_size


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except InvalidArgument as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()


def parse_labels(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise InvalidArgument(f"invalid label {p!r}: use KEY=VALUE")
        out[k] = v
    return out
