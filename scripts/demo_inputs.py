"""The demo's prompt file for a DSB2018 test image: one box per ground-truth object (its bounding box, as
usam_exporters.samples.prompts_from_labels draws them), up to ``--n-objects`` objects.

The model is the demo model trained here (model_packages/dsb2018_vit_t_256/, built by its build.sh); while its
weights are not committed, ``--random-checkpoint PATH`` writes the fallback scripts/demo.sh then exports: a seeded
random-initialised vit_t at input 256 with a seeded AIS decoder (the pipeline is real, the masks are not meaningful).
"""

import argparse
import json
from pathlib import Path

from usam_bioimageio.io.images import read_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--labels", required=True, type=Path, help="ground-truth labels of the demo image")
    parser.add_argument("--n-objects", type=int, default=64)
    parser.add_argument("--random-checkpoint", type=Path, default=None,
                        help="also write a seeded random vit_t (input 256, with AIS decoder) here")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.random_checkpoint is not None:
        from usam_bioimageio.modeling import seeded_sam
        from usam_bioimageio.modeling.unetr import seeded_ais_decoder_state
        from usam_bioimageio.training.checkpoints import save_checkpoint

        save_checkpoint(args.random_checkpoint, sam_state=seeded_sam("vit_t", seed=0, image_size=256).state_dict(),
                        decoder_state=seeded_ais_decoder_state("vit_t", seed=0), image_size=256)
        print(f"wrote {args.random_checkpoint} (seeded random vit_t at 256: the masks are not meaningful)")

    from usam_exporters.samples import prompts_from_labels

    _, boxes = prompts_from_labels(read_image(args.labels), n_objects=args.n_objects)
    objects = [{"box": b.tolist()} for b in boxes]
    (args.out / "prompts.json").write_text(json.dumps({"objects": objects}, indent=1))
    print(f"wrote {args.out / 'prompts.json'} ({len(objects)} boxes)")


if __name__ == "__main__":
    main()
