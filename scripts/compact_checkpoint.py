"""Write a compact copy of a SAM / µSAM checkpoint (int8 weights per output channel, ~1/4 of float32), the
format of the demo model shipped in model_packages/. ``usam export`` reads it like any checkpoint.

Usage: .venv/bin/python scripts/compact_checkpoint.py CHECKPOINT OUT.pt
"""

import argparse
from pathlib import Path

from usam_bioimageio.training.checkpoints import load_checkpoint, save_compact_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    save_compact_checkpoint(args.out, sam_state=ckpt.sam_state, decoder_state=ckpt.decoder_state,
                            image_size=ckpt.image_size)
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.1f} MiB ({ckpt.model_type} at {ckpt.image_size}, "
          f"{'with' if ckpt.has_decoder else 'without'} AIS decoder)")


if __name__ == "__main__":
    main()
