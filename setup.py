"""Only for the optional C kernel; all other metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # optional: without a C compiler bnfold installs anyway and uses the NumPy path
        Extension("bnfold.engine._moments", ["bnfold/engine/_moments.c"], extra_compile_args=["-O3"], optional=True),
    ]
)
