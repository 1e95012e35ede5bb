"""Prompt files: JSON or CSV with the points, boxes and labels of each object (``usam segment --prompts``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class ObjectPrompt:
    """The prompts of one object: any of points (p, 2) with labels (p,), a box (4,), a mask (256, 256)."""

    points: Optional[np.ndarray] = None
    point_labels: Optional[np.ndarray] = None
    box: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None

    def signature(self) -> Tuple[int, bool, bool]:
        n = 0 if self.points is None else len(np.asarray(self.points).reshape(-1, 2))
        return n, self.box is not None, self.mask is not None


def read_prompts(path) -> list:
    """Read object prompts from JSON or CSV.

    JSON: {"objects": [{"points": [[x, y], ...], "labels": [1, 0, ...], "box": [x0, y0, x1, y1]}, ...]}
    (a bare list of objects works too). CSV with a header: object,kind,x,y,label,x1,y1 where kind is
    "point" (x, y, label) or "box" (x, y = top-left, x1, y1 = bottom-right); rows of one object share `object`.
    """
    import csv
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file at {path}")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        items = data.get("objects", []) if isinstance(data, dict) else data
        objects = []
        for k, item in enumerate(items):
            pts = item.get("points")
            labels = item.get("labels", [1] * len(pts) if pts else None)
            if pts is not None and len(labels) != len(pts):
                raise ValueError(f"object {k}: {len(pts)} points but {len(labels)} labels")
            objects.append(ObjectPrompt(points=pts, point_labels=labels, box=item.get("box")))
    elif path.suffix.lower() == ".csv":
        rows: dict = {}
        with path.open(newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                obj = rows.setdefault(row["object"], {"points": [], "labels": [], "box": None})
                if row["kind"] == "point":
                    obj["points"].append([float(row["x"]), float(row["y"])])
                    obj["labels"].append(int(row.get("label") or 1))
                elif row["kind"] == "box":
                    obj["box"] = [float(row["x"]), float(row["y"]), float(row["x1"]), float(row["y1"])]
                else:
                    raise ValueError(f"{path}:{line}: kind must be 'point' or 'box', not {row['kind']!r}")
        objects = [ObjectPrompt(points=o["points"] or None, point_labels=o["labels"] or None, box=o["box"])
                   for o in rows.values()]
    else:
        raise ValueError(f"prompt files are .json or .csv, not {path.suffix!r}")
    if not objects:
        raise ValueError(f"{path} holds no objects")
    return objects
