"""Host runner (no project code): validate each package's rdf.yaml with one bioimageio.spec release.

Writes OUT/<package>.spec.json: ``{"status": ..., "format_version": ..., "errors": [...]}`` (format and file
checks: sha256 of every file, as any parser does on loading).

usage: python run_spec.py JOB OUT
"""

import json
import sys
import traceback
from pathlib import Path


def main():
    job, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    from bioimageio.spec import load_description

    out.mkdir(parents=True, exist_ok=True)
    for name, package in job["packages"].items():
        try:
            descr = load_description(package["zip"], perform_io_checks=True)
            summary = descr.validation_summary
            errors = [f"{d.name}: {e.msg}" for d in summary.details for e in d.errors]
            result = {"status": summary.status, "format_version": str(getattr(descr, "format_version", "")),
                      "errors": errors}
        except Exception:
            result = {"status": "failed", "errors": [traceback.format_exc().strip().splitlines()[-1]]}
        (out / f"{name}.spec.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
