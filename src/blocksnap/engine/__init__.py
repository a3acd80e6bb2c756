"""The engine: pool, volumes, snapshots, block maps and their crash-safe commit."""
