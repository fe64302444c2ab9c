# The C module processors/_formscan.c (see its header and processors/routing.py).
from collections.abc import Callable
from typing import Any

# The fields (dict: path -> str), None (take the full decoder) or NotImplemented
# (a byte above 0x7F: take the Python scan).
def extract(body: bytes, layouts: dict[str, Any], miss: Callable[[str], Any], /) -> Any: ...
