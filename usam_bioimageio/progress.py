"""Progress bars on long work (tqdm), off when ``enabled`` is False."""

from __future__ import annotations


def progress_bar(total: int, done: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit="tile", disable=not enabled, leave=False)
