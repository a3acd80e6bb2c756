"""Recovery from backups without a full restore: a backup's image read on demand
(source.py), served over FUSE (fuse_image.py, server.py), its filesystem mounted
read-only (mount.py), and restore drills on a throwaway overlay (drill.py)."""
