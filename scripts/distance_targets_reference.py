"""Write tests/data/distance_targets_reference.npz: torch_em's AIS training targets for real label crops.

Run in the reference environment of scripts/regenerate_ais_reference.sh (which calls it):
``/tmp/usam-ais-ref/bin/python scripts/distance_targets_reference.py tests/data``.
``PerObjectDistanceTransform`` with the arguments of micro-sam 1.8.14's ``train_sam`` label transform
(distances, boundary distances, foreground; no directed distances) on crops of CC0 / BSD-3 ground truth
(DSB2018, StarDist samples); stored: the label crops (uint16) and the targets (float32), per case, for
``usam_bioimageio.training.targets.distance_targets`` to be compared against.
"""

from __future__ import annotations

import argparse
import json
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# case -> (label file under the shared data folder, crop (y0, y1, x0, x1), min_size)
CASES = {
    "stardist": ("stardist_samples/tests_mask2d.tif", (0, 128, 0, 128), 0),
    "stardist_min_size": ("stardist_samples/mask2d.tif", (100, 228, 50, 178), 25),
    "dsb": ("dsb2018/labels/01d44a26f6680c42ba94c9bc6339228579a95d0e2695b149b7cc0c9592b21baf.tif",
            (0, 112, 0, 160), 0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from micro_sam_env import setup_imports  # torchvision stand-ins for torch_em's module-level imports

    setup_imports()
    import tifffile
    from torch_em.transform.label import PerObjectDistanceTransform

    arrays, meta = {}, {"cases": {}, "versions": {p: metadata.version(p) for p in ("torch_em", "numpy", "scikit-image")}}
    for name, (file, (y0, y1, x0, x1), min_size) in CASES.items():
        labels = tifffile.imread(args.data / file)[y0:y1, x0:x1]
        trafo = PerObjectDistanceTransform(distances=True, boundary_distances=True, directed_distances=False,
                                           foreground=True, instances=False, min_size=min_size)
        targets = trafo(labels)
        arrays[f"labels_{name}"] = labels.astype(np.uint16)
        arrays[f"targets_{name}"] = targets.astype(np.float32)
        meta["cases"][name] = {"file": file, "crop": [y0, y1, x0, x1], "min_size": min_size,
                               "n_objects": int(len(np.unique(labels)) - 1)}
        print(name, labels.shape, targets.shape, targets.dtype)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "distance_targets_reference.npz"
    np.savez_compressed(out, meta=np.asarray(json.dumps(meta)), **arrays)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
