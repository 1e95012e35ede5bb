"""Prompt files for interactive tracking (``usam track --prompts``): JSON objects with the frame ``t`` their
prompts are on and the track they belong to, validated field by field as ``usam segment``'s prompt files.

    {"objects": [
      {"t": 0, "track": 1, "points": [[x, y]], "labels": [1]},
      {"t": 2, "track": 1, "points": [[x, y]], "division": true},
      {"t": 3, "track": 2, "parent": 1, "box": [x0, y0, x1, y1]},
      {"t": 3, "track": 3, "parent": 1, "points": [[x, y], [x, y]], "labels": [1, 0]},
      {"t": 5, "track": 4, "stop": true}
    ]}

``t`` (required): the frame, 0-based. ``points`` / ``labels`` / ``box``: as in ``usam segment`` prompt files
(x = column, y = row). ``track``: the track id (>= 1; objects without one are tracks of their own, numbered after
the highest id given, in file order); several objects of one track on different frames are µSAM's annotations of
one object on several frames. ``division``: the track divides in this frame (µSAM's "division" state; its last
frame). ``parent``: the mother of a daughter track (the mother must divide before the daughter's first frame).
``stop``: no prompts; the track ends before this frame (µSAM's single negative point). A bare list of objects
works too. CSV is not read for tracking.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence, Tuple

from usam_bioimageio.errors import InputError
from usam_bioimageio.io.prompt_files import _json_object, _Where, check_prompts_inside
from usam_bioimageio.tracking.interactive import FramePrompt

__all__ = ["TRACK_FIELDS", "check_track_prompts", "read_track_prompts"]

TRACK_FIELDS = ("t", "track", "parent", "division", "stop")
MAX_TRACK = 65535  # the CTC's 16-bit labels


def _index(item: dict, key: str, where: _Where, minimum: int) -> int:
    value = item[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < minimum \
            or value > MAX_TRACK:
        raise where.error(key, f"expected an integer in {minimum}..{MAX_TRACK}, got {value!r}"[:120])
    return int(value)


def _flag(item: dict, key: str, where: _Where) -> bool:
    value = item.get(key, False)
    if not isinstance(value, bool):
        raise where.error(key, f"expected true or false, got {value!r}"[:120])
    return value


def read_track_prompts(path) -> List[FramePrompt]:
    """Read and validate a tracking prompt file (module doc); InputError names the file, the object and the field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no prompt file at {path}" + (" (a folder)" if path.is_dir() else ""))
    if path.suffix.lower() != ".json":
        raise InputError(f"prompt file {path}: tracking prompt files are .json (with \"t\" and \"track\" per object)")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise InputError(f"prompt file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise InputError(f"prompt file {path} is not valid JSON: {err}") from None
    except RecursionError:
        raise InputError(f"prompt file {path} is nested too deeply to be a prompt file") from None
    if isinstance(data, dict):
        if set(data) != {"objects"}:
            raise InputError(f"prompt file {path}: expected {{\"objects\": [...]}} (or a list of objects)")
        data = data["objects"]
    if not isinstance(data, list):
        raise InputError(f"prompt file {path}: expected a list of objects, got {type(data).__name__}")
    if not data:
        raise InputError(f"prompt file {path} holds no objects")
    rows: List[Tuple[dict, _Where]] = []
    for k, item in enumerate(data):
        where = _Where(path, k)
        if not isinstance(item, dict):
            raise where.error(None, f"expected an object with \"t\" and prompts, got {type(item).__name__}")
        if "t" not in item:
            raise where.error("t", "missing: every object names the frame its prompts are on")
        rows.append((item, where))
    given = [_index(item, "track", where, 1) for item, where in rows if item.get("track") is not None]
    next_track = max(given, default=0) + 1
    out: List[FramePrompt] = []
    for item, where in rows:
        t = _index(item, "t", where, 0)
        if item.get("track") is not None:
            track = _index(item, "track", where, 1)
        else:
            track, next_track = next_track, next_track + 1
        parent = _index(item, "parent", where, 1) if item.get("parent") is not None else 0
        division, stop = _flag(item, "division", where), _flag(item, "stop", where)
        rest = {key: v for key, v in item.items() if key not in TRACK_FIELDS}
        if stop:
            if rest or division:
                raise where.error("stop", "a stop object holds no prompts and no division (it ends the track)")
            out.append(FramePrompt(t=t, track=track, parent=parent, stop=True))
            continue
        try:
            prompt = _json_object(rest, where)
        except InputError as err:
            if "unknown field" in str(err):
                raise InputError(str(err).replace("(fields: points, labels, box, z)",
                                                  "(fields: points, labels, box, " + ", ".join(TRACK_FIELDS) + ")"))
            raise
        if prompt.z is not None:
            raise where.error("z", "a slice index in a tracking prompt file: the frame is \"t\"")
        out.append(FramePrompt(t=t, track=track, prompt=prompt, parent=parent, division=division))
    return out


def check_track_prompts(prompts: Sequence[FramePrompt], n_frames: int, shape: Tuple[int, int], path) -> None:
    """Every object's frame in 0..n_frames - 1 and its points and box inside frames of ``shape`` (H, W)."""
    for k, p in enumerate(prompts):
        if p.t >= n_frames:
            raise _Where(Path(path), k).error("t", f"frame {p.t} is out of range for a time series of {n_frames} "
                                                   f"frames (0..{n_frames - 1})")
    check_prompts_inside([p.prompt for p in prompts if p.prompt is not None], shape, path)
