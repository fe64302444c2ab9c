"""The one thing pyproject.toml cannot declare without an experimental table: the C module.

``chargify_stream.processors._formscan`` is the processor's field scan, built from
processors/_formscan.c. It is optional: on a machine without a C compiler the install still
succeeds and processors/fields.py runs the same scan in Python (the processor logs which
one it uses).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "chargify_stream.processors._formscan",
            sources=["processors/_formscan.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
