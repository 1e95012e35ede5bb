"""Write a compact copy of a SAM / µSAM checkpoint (int8 weights per output channel, ~1/4 of float32), the
format of the demo model shipped in model_packages/. ``usam export`` reads it like any checkpoint.

Usage: .venv/bin/python scripts/compact_checkpoint.py CHECKPOINT OUT.pt [--pixel-scale S]
"""

import argparse
from pathlib import Path

from usam_bioimageio.training.checkpoints import load_checkpoint, save_compact_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out", type=Path)
    parser.add_argument("--pixel-scale", type=float, default=None,
                        help="the pixel scale the model was trained at (default: the one the checkpoint records, or 1)")
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    scale = ckpt.pixel_scale if args.pixel_scale is None else args.pixel_scale
    save_compact_checkpoint(args.out, sam_state=ckpt.sam_state, decoder_state=ckpt.decoder_state,
                            image_size=ckpt.image_size, pixel_scale=scale)
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.1f} MiB ({ckpt.model_type} at {ckpt.image_size}, pixel "
          f"scale {scale:g}, {'with' if ckpt.has_decoder else 'without'} AIS decoder)")


if __name__ == "__main__":
    main()
