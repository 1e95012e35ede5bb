"""Host runner (no project code): run packages' weights on their test inputs with one host runtime.

Runs inside a host environment (scripts/host_envs.sh) with only that runtime installed. Reads a job file
(JSON, written by scripts/host_check.py): ``{"packages": {name: {"weights": {format: file}, "inputs":
[[tensor, .npy]], "outputs": [[tensor, .npy]]}}}`` and writes each output to ``OUT/<package>.<format>.
<tensor>.npy``, or ``OUT/<package>.<format>.error`` with the reason. Default session options, as a host has.

usage: python run_python.py onnx|torchscript JOB OUT
"""

import json
import sys
import traceback
from pathlib import Path

import numpy as np


def run_onnx(weights, inputs):
    import onnxruntime as ort

    session = ort.InferenceSession(weights, providers=["CPUExecutionProvider"])
    return session.run(None, dict(inputs))


def run_torchscript(weights, inputs):
    import torch

    module = torch.jit.load(weights, map_location="cpu")
    module.eval()
    with torch.no_grad():
        out = module(*[torch.from_numpy(a) for _, a in inputs])
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.numpy() for o in out]


def main():
    fmt, job, out = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
    run = {"onnx": run_onnx, "torchscript": run_torchscript}[fmt]
    out.mkdir(parents=True, exist_ok=True)
    for name, package in job["packages"].items():
        if fmt not in package["weights"]:
            continue
        try:
            inputs = [(t, np.load(p)) for t, p in package["inputs"]]
            results = run(package["weights"][fmt], inputs)
            for (tensor, _), value in zip(package["outputs"], results):
                np.save(out / f"{name}.{fmt}.{tensor}.npy", np.asarray(value))
        except Exception:  # a host failure is a result: recorded, and the next package runs
            (out / f"{name}.{fmt}.error").write_text(traceback.format_exc())


if __name__ == "__main__":
    main()
