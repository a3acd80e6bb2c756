"""Block store: raw positional I/O on image files and block devices."""
from .filestore import FileStore, device_size, start_writeback

__all__ = ["FileStore", "device_size", "start_writeback"]
