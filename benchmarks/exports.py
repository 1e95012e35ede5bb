"""The seeded families the benchmarks export into their own work folders, and whether such an export is current.

An export kept from before a change of the code that writes the graphs (usam_bioimageio/modeling, exporters/)
would time the old graphs: each export made here is stamped with the sha256 of that code and counts as current
only while the code is the same. Families a user passes in are used as they are.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_stamp() -> str:
    """sha256 of the sources that shape the exported graphs (the modules and the exporters)."""
    digest = hashlib.sha256()
    for folder in (ROOT / "usam_bioimageio" / "modeling", ROOT / "exporters"):
        for path in sorted(folder.rglob("*.py")):
            digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _stamp(family: Path) -> Path:
    return family.parent / f"{family.name}.code-sha256"


def is_current(family: Path) -> bool:
    """``family`` was exported here by the code as it is now."""
    stamp = _stamp(family)
    return (family / "family.yaml").is_file() and stamp.is_file() and stamp.read_text() == code_stamp()


def mark_current(family: Path) -> None:
    """Record that ``family`` was just exported by the code as it is now."""
    _stamp(family).write_text(code_stamp())


def needs_export(family: Path, *, passed: bool) -> bool:
    """A family the user passed (``passed``) is exported only when it is missing; one in our work folder also when
    it is not current."""
    return not (family / "family.yaml").is_file() if passed else not is_current(family)
