"""Cell Tracking Challenge (CTC) folders: label TIFFs per frame and the ``L B E P`` track table, read and written.

The CTC format: one label image per frame (``maskTTT.tif`` in a result folder, ``man_trackTTT.tif`` in the
``TRA`` ground truth; 3 digits, 4 for 1000 frames or more; any zero padding is read), in which a track's
label is the same in every frame of the track, and one text file (``res_track.txt`` / ``man_track.txt``) with
a line ``L B E P`` per track: label, first and last frame (inclusive) and the parent track's label (0: none).
A track is present in every frame from ``B`` to ``E`` (the CTC allows gaps; we write none), a daughter
begins after its parent ends.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import numpy as np

__all__ = ["CtcFiles", "CtcTracks", "check_tracks", "ctc_files", "read_ctc", "track_table", "write_ctc"]

_MASK = re.compile(r"^(?:mask|man_track)(\d+)\.tiff?$")
_TRACK_FILES = ("res_track.txt", "man_track.txt")


@dataclasses.dataclass(frozen=True)
class CtcTracks:
    """Tracks in the CTC's form: ``masks`` ``(T, ...)`` labelled by track id, ``tracks`` ``(N, 4)`` int64 rows
    ``L B E P`` sorted by label."""

    masks: np.ndarray
    tracks: np.ndarray

    @property
    def n_frames(self) -> int:
        return int(self.masks.shape[0])

    def parents(self) -> Dict[int, int]:
        """Track label -> parent label, for the tracks that have one."""
        return {int(l): int(p) for l, _, _, p in self.tracks.tolist() if p}


def track_table(*, masks: np.ndarray, parents: Optional[Mapping[int, int]] = None) -> np.ndarray:
    """The ``L B E P`` table (int64, sorted by label) of a stack labelled by track id: ``B`` / ``E`` the first
    and last frame holding the label, ``P`` from ``parents`` (label -> parent label; 0 when absent)."""
    masks = np.asarray(masks)
    parents = dict(parents or {})
    first: Dict[int, int] = {}
    last: Dict[int, int] = {}
    for t in range(masks.shape[0]):
        for label in np.unique(masks[t]).tolist():
            if label == 0:
                continue
            first.setdefault(label, t)
            last[label] = t
    rows = [(label, first[label], last[label], int(parents.get(label, 0))) for label in sorted(first)]
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def check_tracks(*, masks: np.ndarray, tracks: np.ndarray) -> List[str]:
    """The ways ``masks`` and ``tracks`` break the CTC's rules (empty when they are consistent): labels missing
    from the table or from a frame of their ``[B, E]``, unknown parents, daughters that begin before their
    parent ends."""
    masks = np.asarray(masks)
    tracks = np.asarray(tracks, dtype=np.int64).reshape(-1, 4)
    problems: List[str] = []
    rows = {int(r[0]): r for r in tracks}
    if len(rows) != len(tracks):
        problems.append("the track table repeats a label")
    present: Dict[int, set] = {}
    for t in range(masks.shape[0]):
        for label in np.unique(masks[t]).tolist():
            if label:
                present.setdefault(label, set()).add(t)
    for label in sorted(set(present) - set(rows)):
        problems.append(f"label {label} is in the masks but not in the track table")
    for label, (_, begin, end, parent) in sorted(rows.items()):
        frames = present.get(label, set())
        if not frames:
            problems.append(f"track {label} is in no mask")
            continue
        if min(frames) != begin or max(frames) != end:
            problems.append(f"track {label}: frames {min(frames)}..{max(frames)} in the masks, {begin}..{end} in "
                            "the table")
        if len(frames) != end - begin + 1:
            problems.append(f"track {label} has gaps")
        if parent:
            if parent not in rows:
                problems.append(f"track {label}: parent {parent} is not a track")
            elif rows[parent][2] >= begin:
                problems.append(f"track {label} begins at {begin}, before its parent {parent} ends")
    return problems


def _track_file(folder: Path) -> Path:
    found = [folder / name for name in _TRACK_FILES if (folder / name).is_file()]
    if not found:
        raise FileNotFoundError(f"{folder}: no res_track.txt or man_track.txt (not a CTC folder)")
    return found[0]


@dataclasses.dataclass(frozen=True)
class CtcFiles:
    """The files of a CTC folder: the frames' label TIFFs in time order and the track table."""

    frames: List[Path]
    track_file: Path


def ctc_files(*, folder: Path) -> CtcFiles:
    """The files of a CTC folder (result: ``mask*.tif`` + ``res_track.txt``; ground truth ``TRA``:
    ``man_track*.tif`` + ``man_track.txt``; a folder holding ``TRA/`` is read from there)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if (folder / "TRA").is_dir() and not any(_MASK.match(p.name) for p in folder.iterdir()):
        folder = folder / "TRA"
    frames = {}
    for path in folder.iterdir():
        match = _MASK.match(path.name)
        if match:
            frames[int(match.group(1))] = path
    if not frames:
        raise FileNotFoundError(f"{folder}: no mask*.tif or man_track*.tif frames")
    if sorted(frames) != list(range(len(frames))):
        raise ValueError(f"{folder}: frames must be numbered 0 .. {len(frames) - 1}, found "
                         f"{min(frames)} .. {max(frames)} ({len(frames)} files)")
    return CtcFiles(frames=[frames[t] for t in range(len(frames))], track_file=_track_file(folder))


def read_ctc(*, folder: Path) -> CtcTracks:
    """A CTC folder read into memory (the files :func:`ctc_files` finds)."""
    import tifffile

    files = ctc_files(folder=folder)
    masks = np.stack([tifffile.imread(path) for path in files.frames])
    text = files.track_file.read_text(encoding="utf-8").split()
    if len(text) % 4:
        raise ValueError(f"{files.track_file}: every line must hold four numbers L B E P")
    tracks = np.array([int(x) for x in text], dtype=np.int64).reshape(-1, 4)
    tracks = tracks[np.argsort(tracks[:, 0], kind="stable")]
    return CtcTracks(masks=masks, tracks=tracks)


def write_ctc(*, folder: Path, tracks: CtcTracks, result: bool = True) -> Path:
    """Write ``tracks`` as a CTC result folder (``maskTTT.tif`` + ``res_track.txt``) or, with ``result`` False,
    as ground truth (``man_trackTTT.tif`` + ``man_track.txt``); returns the folder. Labels must fit uint16 (the
    CTC's 16-bit labels) and the table must be consistent with the masks."""
    import tifffile

    masks, table = np.asarray(tracks.masks), np.asarray(tracks.tracks, dtype=np.int64).reshape(-1, 4)
    if masks.ndim < 3:
        raise ValueError(f"masks must be (T, Y, X) or (T, Z, Y, X), got shape {masks.shape}")
    if masks.size and masks.max() > np.iinfo(np.uint16).max:
        raise ValueError(f"track labels go up to {int(masks.max())}: the CTC format holds 16-bit labels")
    problems = check_tracks(masks=masks, tracks=table)
    if problems:
        raise ValueError("inconsistent tracks: " + "; ".join(problems[:5]))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digits = 3 if masks.shape[0] <= 1000 else 4
    stem, table_name = ("mask", "res_track.txt") if result else ("man_track", "man_track.txt")
    for t in range(masks.shape[0]):
        tifffile.imwrite(folder / f"{stem}{t:0{digits}d}.tif", masks[t].astype(np.uint16))
    lines = [" ".join(str(int(x)) for x in row) for row in table]
    (folder / table_name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return folder
