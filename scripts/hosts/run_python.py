"""Host runner (no project code): run packages' weights on their test inputs with one host runtime.

Runs inside a host environment (scripts/host_envs.sh) with only that runtime installed. Reads a job file
(JSON, written by scripts/host_check.py): ``{"packages": {name: {"weights": {format: file}, "inputs":
[[tensor, .npy]], "outputs": [[tensor, .npy]]}}}`` and writes each output to ``OUT/<package>.<format>.
<tensor>.npy``, or ``OUT/<package>.<format>.error`` with the reason. Default session options, as a host has.

usage: python run_python.py onnx|torchscript JOB OUT [LEVEL]   (LEVEL, ONNX only: the graph optimisation level,
disabled / basic / extended / all; default: the session's default, all)
"""

import json
import sys
import traceback
from pathlib import Path

import numpy as np


LEVEL = None


def run_onnx(weights, inputs):
    import onnxruntime as ort

    options = None
    if LEVEL is not None:
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[LEVEL]
    session = ort.InferenceSession(weights, options, providers=["CPUExecutionProvider"])
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
    global LEVEL
    fmt, job, out = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
    LEVEL = sys.argv[4] if len(sys.argv) > 4 else None
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
