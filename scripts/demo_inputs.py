"""Inputs of the demo: a checkpoint and a prompt file for a DSB2018 test image (boxes from its ground truth).

Until the project ships its own trained demo model, the checkpoint is a seeded random-initialised vit_t:
the pipeline is real, the masks are not meaningful.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from usam_bioimageio.io.images import read_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--labels", required=True, type=Path, help="ground-truth labels of the demo image")
    parser.add_argument("--n-objects", type=int, default=12)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from usam_bioimageio.modeling import seeded_sam
    from usam_bioimageio.training.checkpoints import save_checkpoint
    from usam_exporters.samples import prompts_from_labels

    save_checkpoint(args.out / "vit_t_random.pt", sam_state=seeded_sam("vit_t", seed=0).state_dict())
    points, boxes = prompts_from_labels(read_image(args.labels), n_objects=args.n_objects)
    objects = [{"box": b.tolist()} for b in boxes[: len(boxes) // 2]]
    objects += [{"points": p.tolist(), "labels": [1]} for p in points[len(boxes) // 2:]]
    (args.out / "prompts.json").write_text(json.dumps({"objects": objects}, indent=1))
    print(f"wrote {args.out / 'vit_t_random.pt'} and {args.out / 'prompts.json'} ({len(objects)} objects)")


if __name__ == "__main__":
    main()
