"""`usam evaluate`: a model on a dataset's splits -> a report."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_evaluate(args: argparse.Namespace) -> int:
    import shlex

    from usam_bioimageio.cli.files import Output, check_outputs, load_model
    from usam_bioimageio.evaluation.report import run_evaluation, write_report
    from usam_bioimageio.io.datasets import read_split

    # the report folder and the data are checked before the model is loaded
    check_outputs([Output("--out", Path(args.out), "report")], [("--data", args.data)], overwrite=args.overwrite)
    val = read_split(Path(args.data), args.val_split, args.limit) if {"ais", "amg"} & set(args.modes) else []
    test = read_split(Path(args.data), args.test_split, args.limit)
    model = load_model(args)
    results = run_evaluation(model, val, test, modes=args.modes, n_iterations=args.n_iterations, seed=args.seed,
                             progress=not args.quiet)
    command = "usam evaluate " + " ".join(shlex.quote(a) for a in args.argv)
    report = write_report(results, Path(args.out), title=args.title or f"Evaluation of {args.model}", command=command)
    print(f"wrote {report}")
    return 0
