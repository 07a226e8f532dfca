"""Keeping patient identifiers and input paths out of everything MedSSL writes.

Bundles, logs, reports and progress lines name inputs by position and hashed id only. Error messages
on stderr still name the path the user gave (so they can fix it); nothing else does.
"""

from __future__ import annotations

import os
from pathlib import Path


def redact_paths(message: str, sources: list) -> str:
    """Replace every source path (and its file or folder name) in ``message`` with ``volume <n>``."""
    for n, source in sorted(enumerate(sources, start=1), key=lambda item: -len(os.fspath(item[1]))):
        text = os.fspath(source)
        for variant in sorted({text, str(Path(text).resolve()), Path(text).name}, key=len, reverse=True):
            if variant:
                message = message.replace(variant, f"volume {n}")
    return message
