"""Backups to a local or S3-compatible repository: deduplicated, compressed and
encrypted chunks in packs, one manifest per backup (see docs/backups.md)."""
