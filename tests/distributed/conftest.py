"""The distributed tests import the launcher next to them and the wrap helpers."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent / "runtime"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
