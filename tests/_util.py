"""Small helpers shared by the top-level tests (imported as ``_util``; conftest modules shadow each other)."""

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list) -> Path:
    """Write dicts (as JSON) or raw strings, one per line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
