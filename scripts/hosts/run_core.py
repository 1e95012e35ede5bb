"""Host runner (no project code): bioimageio.core's own test and prediction of each package.

Runs inside a bioimageio.core host environment (scripts/host_envs.sh). For each package zip and weight
format: ``bioimageio.core.test_model`` (the description validated, the test outputs reproduced from the
test inputs, other valid sizes run) and one prediction of the test inputs through bioimageio.core's own
pipeline, whose outputs are written as OUT/<package>.<format>.<tensor>.npy for the caller to compare.
``OUT/<package>.<format>.core.json`` holds the test's status and errors; ``.error`` a crash.

usage: python run_core.py JOB OUT PREDICT_FORMATS TEST_FORMATS   (comma-separated; TEST_FORMATS may be
"-" for none)
"""

import json
import sys
import traceback
from pathlib import Path

import numpy as np


def predict(descr, fmt):
    from bioimageio.core import create_prediction_pipeline
    from bioimageio.core.digest_spec import get_test_inputs

    sample = get_test_inputs(descr)
    with create_prediction_pipeline(descr, weight_format=fmt) as pipeline:
        out = pipeline.predict_sample_without_blocking(sample)
    return {str(k): np.asarray(v.data) for k, v in out.members.items()}


def main():
    job, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    formats, tested = sys.argv[3].split(","), [f for f in sys.argv[4].split(",") if f != "-"]
    from bioimageio.core import load_description, test_model

    out.mkdir(parents=True, exist_ok=True)
    for name, package in job["packages"].items():
        for fmt in formats:
            if fmt not in package["weights"]:
                continue
            try:
                if fmt in tested:
                    summary = test_model(package["zip"], weight_format=fmt)
                    errors = [f"{d.name}: {e.msg}" for d in summary.details for e in d.errors]
                    (out / f"{name}.{fmt}.core.json").write_text(json.dumps({"status": summary.status,
                                                                             "errors": errors}))
                descr = load_description(package["zip"], perform_io_checks=True)
                if descr.validation_summary.status == "failed":
                    errors = [f"{d.name}: {e.msg}" for d in descr.validation_summary.details for e in d.errors]
                    raise RuntimeError("invalid description: " + "; ".join(errors))
                for tensor, value in predict(descr, fmt).items():
                    np.save(out / f"{name}.{fmt}.{tensor}.npy", value)
            except Exception:
                (out / f"{name}.{fmt}.error").write_text(traceback.format_exc())


if __name__ == "__main__":
    main()
