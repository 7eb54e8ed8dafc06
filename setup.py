"""Build of the optional C fast path; everything else is declared in pyproject.toml.

``optional=True``: without a C compiler the package still installs and serves
everything through the pure-Python path (meta169.http.wire.compiled() is then False).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "meta169.http._wire",
            ["src/meta169/http/_wire.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
