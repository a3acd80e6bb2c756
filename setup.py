"""The compiled parts: the block store's read path (store/_blockread.c), the engine's
direct path for leased blocks (engine/_direct.c) and the FUSE callbacks in front of
it (fuse/_fastfuse.c).

They are optional: without a C compiler, Python headers or xxhash.h (Debian's
libxxhash-dev) the build goes on, blockio falls back to its Python read path, the
pool lock is a threading.RLock and every FUSE request takes the Python path.
"""
from setuptools import Extension, setup

AVX2 = "src/blocksnap/store/_blockread_avx2.c"

setup(ext_modules=[
    Extension("blocksnap.store._blockread", ["src/blocksnap/store/_blockread.c", AVX2],
              depends=["src/blocksnap/store/fileio.h"], extra_compile_args=["-O3"], optional=True),
    Extension("blocksnap.engine._direct", ["src/blocksnap/engine/_direct.c", AVX2],
              depends=["src/blocksnap/engine/direct_state.h", "src/blocksnap/store/fileio.h"],
              extra_compile_args=["-O3"], optional=True),
    Extension("blocksnap.fuse._fastfuse", ["src/blocksnap/fuse/_fastfuse.c"],
              depends=["src/blocksnap/engine/direct_state.h"], extra_compile_args=["-O3"], optional=True),
])
