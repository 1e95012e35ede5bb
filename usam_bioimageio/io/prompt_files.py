"""Prompt files: JSON or CSV with the points, boxes and labels of each object (``usam segment --prompts``),
validated field by field: every error names the file, the object and the field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from usam_bioimageio.errors import InputError

JSON_FIELDS = ("points", "labels", "box", "z")
CSV_COLUMNS = ("object", "kind", "x", "y")  # and label (optional, default 1); x1, y1 for boxes; z


@dataclass(frozen=True)
class ObjectPrompt:
    """The prompts of one object: any of points (p, 2) with labels (p,), a box (4,), a mask prompt (L, L)
    (low-res logits, L = N / 4 for the model's input size N: 256 at 1024).

    ``name``: where it came from, for messages (the index in a JSON file, the ``object`` column of a CSV file).
    ``z``: the slice the prompts are on, for a volume (``usam segment --volume``); None for a 2D image.
    """

    points: Optional[np.ndarray] = None
    point_labels: Optional[np.ndarray] = None
    box: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None
    name: Optional[Union[int, str]] = field(default=None, compare=False)
    z: Optional[int] = None

    def signature(self) -> Tuple[int, bool, bool]:
        n = 0 if self.points is None else len(np.asarray(self.points).reshape(-1, 2))
        return n, self.box is not None, self.mask is not None


def _object(name) -> str:
    return f"object {name}" if isinstance(name, int) else f"object {name!r}"


class _Where:
    """The place of a value in a prompt file, for messages: ``FILE: object 3: field 'box': ...``."""

    def __init__(self, path: Path, name, line: Optional[int] = None):
        self.path, self.name, self.line = path, name, line

    def error(self, field_name: Optional[str], text: str) -> InputError:
        place = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        what = f"{_object(self.name)}: field {field_name!r}" if field_name else _object(self.name)
        return InputError(f"prompt file {place}: {what}: {text}")


def _number(value, where: _Where, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(field_name, f"expected a number, got {type(value).__name__} {_short(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise where.error(field_name, f"{_short(value)} is not a finite number")
    return number


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _slice_index(value, where: _Where) -> int:
    number = _number(value, where, "z")
    if number < 0 or number != int(number):
        raise where.error("z", f"the slice index must be an integer >= 0, got {_short(value)}")
    return int(number)


def _check_box(box: Sequence[float], where: _Where) -> np.ndarray:
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        raise where.error("box", f"{[x0, y0, x1, y1]} must be [x0, y0, x1, y1] with x1 >= x0 and y1 >= y0")
    return np.asarray(box, dtype=np.float64)


def _json_object(item, where: _Where) -> ObjectPrompt:
    if not isinstance(item, dict):
        raise where.error(None, f"expected an object like {{\"box\": [x0, y0, x1, y1]}} or {{\"points\": [[x, y]], "
                                f"\"labels\": [1]}}, got {type(item).__name__} {_short(item)}")
    unknown = sorted(str(k) for k in item if k not in JSON_FIELDS)
    if unknown:
        raise where.error(unknown[0], f"unknown field (fields: {', '.join(JSON_FIELDS)})")
    points = labels = box = None
    if item.get("points") not in (None, []):  # [] is no points
        raw = item["points"]
        if not isinstance(raw, list):
            raise where.error("points", f"expected a list of [x, y] pairs, got {_short(raw)}")
        pts = []
        for p in raw:
            if not isinstance(p, list) or len(p) != 2:
                raise where.error("points", f"expected [x, y] pairs, got {_short(p)}")
            pts.append([_number(v, where, "points") for v in p])
        points = np.asarray(pts, dtype=np.float64)
    if item.get("labels") not in (None, []) or (points is not None and item.get("labels") == []):
        raw = item["labels"]
        if points is None:
            raise where.error("labels", "labels without points")
        if not isinstance(raw, list):
            raise where.error("labels", f"expected a list of 0 / 1, got {_short(raw)}")
        if len(raw) != len(points):
            raise where.error("labels", f"{len(points)} points but {len(raw)} labels")
        for v in raw:
            if isinstance(v, bool) or v not in (0, 1):
                raise where.error("labels", f"labels are 1 (positive) or 0 (negative), got {_short(v)}")
        labels = np.asarray(raw, dtype=np.int64)
    elif points is not None:
        labels = np.ones(len(points), dtype=np.int64)
    if item.get("box") is not None:
        raw = item["box"]
        if not isinstance(raw, list) or len(raw) != 4:
            raise where.error("box", f"expected [x0, y0, x1, y1], got {_short(raw)}")
        box = _check_box([_number(v, where, "box") for v in raw], where)
    if points is None and box is None:
        raise where.error(None, "no prompt: give \"points\" (with \"labels\") and / or a \"box\"")
    z = None if item.get("z") is None else _slice_index(item["z"], where)
    return ObjectPrompt(points=points, point_labels=labels, box=box, name=where.name, z=z)


def _read_json(path: Path, text: str) -> list:
    import json

    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"prompt file {path} is not valid JSON: {err}") from None
    except RecursionError:
        raise InputError(f"prompt file {path} is nested too deeply to be a prompt file") from None
    if isinstance(data, dict):
        if "objects" not in data:
            raise InputError(f"prompt file {path}: expected {{\"objects\": [...]}} (or a list of objects), "
                             f"found the keys {sorted(map(str, data))[:5]}")
        data = data["objects"]
    if not isinstance(data, list):
        raise InputError(f"prompt file {path}: \"objects\" must be a list of objects, got {type(data).__name__}")
    return [_json_object(item, _Where(path, k)) for k, item in enumerate(data)]


def _csv_number(row: dict, column: str, where: _Where) -> float:
    text = (row.get(column) or "").strip()
    if not text:
        raise where.error(column, "missing value")
    try:
        value = float(text)
    except ValueError:
        raise where.error(column, f"{_short(text)} is not a number") from None
    if not math.isfinite(value):
        raise where.error(column, f"{_short(text)} is not a finite number")
    return value


def _read_csv(path: Path, text: str) -> list:
    import csv
    import io

    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise InputError(f"prompt file {path}: missing column(s) {', '.join(missing)} in the header (expected "
                             "object,kind,x,y,label,x1,y1)")
        rows: dict = {}
        for line, row in enumerate(reader, start=2):
            name = (row.get("object") or "").strip()
            where = _Where(path, name, line)
            if not name:
                raise where.error("object", "missing value (rows of one object share its name)")
            kind = (row.get("kind") or "").strip()
            obj = rows.setdefault(name, {"points": [], "labels": [], "box": None, "z": None})
            if "z" in header:  # every row of an object on one slice
                z = _slice_index(_csv_number(row, "z", where), where)
                if obj["z"] is not None and obj["z"] != z:
                    raise where.error("z", f"slice {z}, but an earlier row of this object is on slice {obj['z']}")
                obj["z"] = z
            if kind == "point":
                obj["points"].append([_csv_number(row, "x", where), _csv_number(row, "y", where)])
                label = (row.get("label") or "").strip() or "1"
                if label not in ("0", "1"):
                    raise where.error("label", f"labels are 1 (positive) or 0 (negative), got {_short(label)}")
                obj["labels"].append(int(label))
            elif kind == "box":
                for column in ("x1", "y1"):
                    if column not in header:
                        raise InputError(f"prompt file {path}: a box on line {line} needs the column {column}")
                if obj["box"] is not None:
                    raise where.error("kind", "a second box for this object (one box per object)")
                obj["box"] = _check_box([_csv_number(row, c, where) for c in ("x", "y", "x1", "y1")], where)
            else:
                raise where.error("kind", f"must be 'point' or 'box', not {_short(kind)}")
    except csv.Error as err:
        raise InputError(f"prompt file {path} is not valid CSV: line {reader.line_num}: {err}") from None
    return [ObjectPrompt(points=np.asarray(o["points"], np.float64) if o["points"] else None,
                         point_labels=np.asarray(o["labels"], np.int64) if o["labels"] else None,
                         box=o["box"], name=name, z=o["z"])
            for name, o in rows.items()]


def read_prompts(path) -> list:
    """Read and validate object prompts from JSON or CSV; InputError names the file, the object and the field.

    JSON: {"objects": [{"points": [[x, y], ...], "labels": [1, 0, ...], "box": [x0, y0, x1, y1]}, ...]}
    (a bare list of objects works too; labels default to 1). CSV with a header: object,kind,x,y,label,x1,y1
    where kind is "point" (x, y, label; label 1 if empty) or "box" (x, y = top-left, x1, y1 = bottom-right); rows
    of one object share `object`. For a volume each object names its slice: "z" in JSON, a column z in CSV. Coordinates are pixels (x = column, y = row); :func:`check_prompts_inside`
    checks them against an image.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no prompt file at {path}" + (" (a folder)" if path.is_dir() else ""))
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise InputError(f"prompt file {path}: prompt files are .json or .csv, not {suffix or 'without suffix'}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"prompt file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    objects = _read_json(path, text) if suffix == ".json" else _read_csv(path, text)
    if not objects:
        raise InputError(f"prompt file {path} holds no objects")
    return objects


def check_prompts_inside(objects: Sequence[ObjectPrompt], shape: Tuple[int, int], path) -> None:
    """Every point and box corner of ``objects`` (read from ``path``) inside an image of ``shape`` (height,
    width): 0 <= x <= width, 0 <= y <= height, as the prompt decoder's inputs require."""
    h, w = int(shape[0]), int(shape[1])
    for k, obj in enumerate(objects):
        where = _Where(Path(path), obj.name if obj.name is not None else k)
        for name, coords in (("points", obj.points), ("box", obj.box)):
            if coords is None:
                continue
            for x, y in np.asarray(coords, dtype=np.float64).reshape(-1, 2):
                if not (0 <= x <= w and 0 <= y <= h):
                    raise where.error(name, f"[{x:g}, {y:g}] lies outside the image of width {w} and height {h} "
                                            "(x is the column, y the row)")


def check_prompt_slices(objects: Sequence[ObjectPrompt], n_slices: Optional[int], path) -> None:
    """``n_slices`` None (a 2D image): no object may name a slice; else every object names one in 0..n-1."""
    for k, obj in enumerate(objects):
        where = _Where(Path(path), obj.name if obj.name is not None else k)
        if n_slices is None and obj.z is not None:
            raise where.error("z", "a slice index for a 2D image: segment a volume with `usam segment --volume`")
        if n_slices is not None and obj.z is None:
            raise where.error("z", f"missing: in a volume every object names the slice its prompts are on "
                                   f"(0..{n_slices - 1})")
        if n_slices is not None and obj.z >= n_slices:
            raise where.error("z", f"slice {obj.z} is out of range for a volume of {n_slices} slices "
                                   f"(0..{n_slices - 1})")
