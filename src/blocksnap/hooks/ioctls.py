"""Linux ioctl numbers for filesystem freeze (linux/fs.h). watchdog.py keeps its own
copy: it runs as a standalone script and imports nothing from the package."""
FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)
