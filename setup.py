"""Build configuration beyond pyproject.toml: the optional compiled histogram search.

``qcore.observers._search_kernel`` is built when a C compiler is available; without one the
build skips it (``optional=True``) and qcore uses the same search written with numpy.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "qcore.observers._search_kernel",
            sources=["qcore/observers/_search_kernel.c"],
            optional=True,
        )
    ]
)
