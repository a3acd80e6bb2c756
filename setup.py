"""The one compiled part: the block store's read path (store/_blockread.c).

It is optional: without a C compiler, Python headers or xxhash.h (Debian's
libxxhash-dev) the build goes on and blockio falls back to its Python read path.
"""
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("blocksnap.store._blockread",
              ["src/blocksnap/store/_blockread.c", "src/blocksnap/store/_blockread_avx2.c"],
              extra_compile_args=["-O3"], optional=True),
])
