"""Block store: raw positional I/O on image files and block devices."""
from .filestore import FileStore, WriteFailed, device_size, start_writeback

__all__ = ["FileStore", "WriteFailed", "device_size", "start_writeback"]
