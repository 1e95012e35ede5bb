"""Host runner (no project code): bioimageio.core's own test and prediction of each package.

Runs inside a bioimageio.core host environment (scripts/host_envs.sh). For each package zip and weight
format: ``bioimageio.core.test_model`` (the description validated, the test outputs reproduced from the
test inputs, other valid sizes run) and one prediction of the test inputs through bioimageio.core's own
pipeline, whose outputs are written as OUT/<package>.<format>.<tensor>.npy for the caller to compare.
``OUT/<package>.<format>.core.json`` holds the test's status and errors; ``.error`` a crash.

usage: python run_core.py JOB OUT FORMAT [FORMAT ...]
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
    job, out, formats = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), sys.argv[3:]
    from bioimageio.core import load_description, test_model

    out.mkdir(parents=True, exist_ok=True)
    for name, package in job["packages"].items():
        for fmt in formats:
            if fmt not in package["weights"]:
                continue
            try:
                summary = test_model(package["zip"], weight_format=fmt)
                errors = [f"{d.name}: {e.msg}" for d in summary.details for e in d.errors]
                (out / f"{name}.{fmt}.core.json").write_text(json.dumps({"status": summary.status, "errors": errors}))
                descr = load_description(package["zip"])
                for tensor, value in predict(descr, fmt).items():
                    np.save(out / f"{name}.{fmt}.{tensor}.npy", value)
            except Exception:
                (out / f"{name}.{fmt}.error").write_text(traceback.format_exc())


if __name__ == "__main__":
    main()
