"""Placeholder until the subsystem lands."""
COMMANDS: list = []
