"""`usam export` and `usam validate`: checkpoints -> package families, and bioimageio.core's test of packages."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from usam_bioimageio.errors import UsageError, UsamError


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from usam_exporters.family import export_family
    except ImportError as err:
        raise UsamError(f"usam export needs the exporters: pip install 'usam-bioimageio[export]' ({err})") from err
    out = export_family(
        checkpoint=args.checkpoint,
        output_dir=Path(args.out),
        name=args.name,
        model_type=args.model_type,
        sample_image=args.sample_image,
        sample_labels=args.sample_labels,
        overwrite=args.overwrite,
        vit_t_attention_biases=args.vit_t_attention_biases,
        progress=not args.quiet,
        **({"formats": tuple(args.formats)} if args.formats else {}),
    )
    if args.encoder_variants:
        if "onnx" not in (args.formats or ("onnx",)):
            raise UsageError("--encoder-variants are made from the ONNX weights: include onnx in --formats")
        from usam_exporters.precision import write_encoder_variants

        for precision, path in write_encoder_variants(Path(out), args.encoder_variants).items():
            print(f"wrote {path} ({precision} image encoder)")
    print(f"wrote {out}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        from usam_exporters.writer import validate_package
    except ImportError as err:
        raise UsamError(f"usam validate needs bioimageio.core: pip install 'usam-bioimageio[export]' ({err})") from err
    ok = True
    for path in args.packages:
        try:
            summary = validate_package(Path(path))
        except UsamError as err:  # refused before bioimageio.core saw it (untrusted, unreadable): the next one
            print(f"usam validate: error: {' '.join(str(err).split())}", file=sys.stderr)
            ok = False
            continue
        for fmt, status in summary.items():
            print(f"{path}: {fmt}: {status}")
            ok &= status == "passed"
        for reason in summary.errors:  # why a check failed, one line each
            print(f"{path}: failed: {reason}")
        ok &= summary.passed
    return 0 if ok else 1
