"""Send and receive: a snapshot as a self-checking byte stream, whole or incremental."""
from .receive import receive
from .send import send

__all__ = ["receive", "send"]
