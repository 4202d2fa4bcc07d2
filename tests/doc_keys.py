"""The key paths a document lists for a JSON file, and the key paths a written file has (shared by the report tests).

A key path is dotted: ``results.*.features[].atoms[].head``, ``*`` for any key of a mapping, ``[]`` for each item of a
list (the notation of :mod:`sparsedecomp.jsonio`)."""

import re
from pathlib import Path


def documented_keys(doc: Path, section: str) -> list[str]:
    """The key paths in the first column (in backticks) of the table under ``## {section}`` of ``doc``."""
    text = doc.read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE)


def file_key_paths(data, documented: set[str]) -> set[str]:
    """The key paths of JSON ``data``, any key of a documented mapping (``path.*``) written as ``*``; a key neither
    documented nor under a documented mapping is kept as it is (and then fails a comparison). Below a ``*`` with no
    documented children (free-form values, e.g. a solver's parameters) nothing is walked."""
    found: set[str] = set()

    def walk(value, path):
        if isinstance(value, dict):
            for key, item in value.items():
                named = f"{path}.{key}" if path else key
                child = named if named in documented or f"{path}.*" not in documented else f"{path}.*"
                found.add(child)
                if child.endswith("*") and not any(d.startswith((child + ".", child + "[")) for d in documented):
                    continue
                walk(item, child)
        elif isinstance(value, list):
            for item in value:
                walk(item, f"{path}[]")

    walk(data, "")
    return found
