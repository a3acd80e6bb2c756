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


def keep_options(fn):
    """--keep-last/hourly/daily/weekly/monthly/yearly N and --keep-within DURATION."""
    periods = {"yearly": "year", "monthly": "month", "weekly": "week", "daily": "day", "hourly": "hour"}
    for name, period in periods.items():
        fn = click.option(f"--keep-{name}", type=click.IntRange(min=0), default=0, metavar="N",
                          help=f"Keep the newest of each {period}, for the N newest {period}s that have one.")(fn)
    fn = click.option("--keep-last", type=click.IntRange(min=0), default=0, metavar="N",
                      help="Keep the N newest.")(fn)
    return click.option("--keep-within", metavar="DURATION",
                        help="Keep everything newer than this (e.g. 36h, 7d, 2w, 6m, 1y).")(fn)


def keep_policy(kw: dict):
    """The retention Policy from keep_options' values (popped from kw)."""
    from ..retention import Policy, parse_duration
    within = kw.pop("keep_within")
    return Policy(**{k: kw.pop(f"keep_{k}") for k in ("last", "hourly", "daily", "weekly", "monthly", "yearly")},
                  within=parse_duration(within) if within else 0.0)
