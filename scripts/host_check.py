"""Host-conformance check: our packages run in the runtimes hosts use, without our code.

Each host runtime (installed by scripts/host_envs.sh, each in a clean environment without this project)
loads each package of a vit_t family with an AIS decoder, runs the package's test inputs at default
session options, and its outputs are compared here with the package's test outputs: max abs diff <= 1e-4
and, for the AIS maps, identical labels from µSAM's post-processing. bioimageio.core environments also run
their own ``test_model`` on each package, which must pass. Prints a package x runtime table and writes
``--report`` (default ``reports/hosts.json``):
``{"runtimes": {name: {package: {"ok": bool, "max_abs": float, ...}}}, ...}``.

usage: python scripts/host_check.py [--family DIR] [--runtimes NAME ...] [--report FILE] [--work DIR]
Without ``--family``, a seeded random vit_t family with a seeded AIS decoder is exported first (all weight
formats, from a DSB2018 test image). Exit status 1 when any package fails in any runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "hosts"
DSB = ROOT.parent / "shared" / "data" / "dsb2018"
TOLERANCE = 1e-4
AIS_KINDS = ("ais", "ais_head")
OPT_LEVELS = ("disabled", "basic", "extended", "all")  # ONNX Runtime's graph optimisation levels
AIS_DECODER_SEED = 4  # the tests' seeded UNETR decoder (tests/conftest.py AIS_TEST_DECODER_SEED)


def hosts_dir() -> Path:
    return Path(os.environ.get("USAM_HOSTS_DIR", Path.home() / ".cache" / "usam-bioimageio" / "hosts"))


# name -> (weight formats it runs, command prefix given the environment folder)
# the bioimageio.core that --quick (CI) runs test_model in: BioEngine's pin
GATE_RUNTIME = "core-0.10.4"
RUNTIMES = {
    "ort-1.13.1": (("onnx",), lambda env: ["node", str(HERE / "run_node.js")]),
    "ort-1.15.1": (("onnx",), lambda env: [str(env / "bin" / "python"), str(HERE / "run_python.py"), "onnx"]),
    "ort-1.16.3": (("onnx",), lambda env: [str(env / "bin" / "python"), str(HERE / "run_python.py"), "onnx"]),
    "ort-1.20.1": (("onnx",), lambda env: [str(env / "bin" / "python"), str(HERE / "run_python.py"), "onnx"]),
    "ort-newest": (("onnx",), lambda env: [str(env / "bin" / "python"), str(HERE / "run_python.py"), "onnx"]),
    "torch-1.13": (("torchscript",), lambda env: [str(env / "python"), "-s", str(HERE / "run_python.py"),
                                                   "torchscript"]),
    "torch-pinned": (("torchscript",), lambda env: [str(env / "bin" / "python"), str(HERE / "run_python.py"),
                                                     "torchscript"]),
    "core-0.10.4": (("onnx", "torchscript"), lambda env: [str(env / "bin" / "python"), str(HERE / "run_core.py")]),
    "core-newest": (("onnx", "torchscript"), lambda env: [str(env / "bin" / "python"), str(HERE / "run_core.py")]),
}

# --quick (CI): ONNX Runtime 1.16.3 and 1.20.1 sit between 1.15.1 and the newest with the same graph optimiser as
# 1.15.1 (the float64 FusedMatMul failure measured on 1.15-1.25 shows on 1.15.1 too); the full check runs them
QUICK_RUNTIMES = tuple(name for name in RUNTIMES if name not in ("ort-1.16.3", "ort-1.20.1"))

# description parsers that only validate (the newest bioimageio.spec: bioimageio.core pins an older one)
PARSERS = {"spec-newest": lambda env: [str(env / "bin" / "python"), str(HERE / "run_spec.py")]}


def run_parser(name: str, job_file: Path, job: dict, work: Path) -> dict:
    env_dir, out = hosts_dir() / name, work / "outputs" / name
    proc = subprocess.run(PARSERS[name](env_dir) + [str(job_file), str(out)], cwd=work, capture_output=True,
                          text=True)
    results = {}
    for kind in job["packages"]:
        f = out / f"{kind}.spec.json"
        r = json.loads(f.read_text()) if f.exists() else {"status": "failed", "errors": [proc.stderr[-300:]]}
        results[kind] = {"ok": r["status"] in ("valid-format", "passed"), **r}
    return results


def export_test_family(out: Path, *, quick: bool = False) -> Path:
    """A seeded random vit_t with a seeded AIS decoder, exported in every weight format (``quick``: torchscript
    and ONNX, what hosts run); not gated here: the bioimageio.core environments of this check are the gate."""
    from usam_bioimageio.modeling import seeded_sam
    from usam_bioimageio.modeling.unetr import seeded_ais_decoder_state
    from usam_bioimageio.training.checkpoints import save_checkpoint
    from usam_exporters.family import export_family

    sid = json.loads((DSB / "splits.json").read_text())["test"][0]
    ckpt = save_checkpoint(out / "vit_t_hosts.pt", sam_state=seeded_sam("vit_t", seed=0).state_dict(),
                           decoder_state=seeded_ais_decoder_state("vit_t", AIS_DECODER_SEED, use_conv_transpose=True))
    formats = ("torchscript", "onnx") if quick else ("torchscript", "onnx", "pytorch_state_dict")
    return export_family(checkpoint=ckpt, output_dir=out / "family", name="vit_t_hosts", test=False, formats=formats,
                         sample_image=DSB / "images" / f"{sid}.png", sample_labels=DSB / "labels" / f"{sid}.tif")


def _source(entry) -> str:
    return entry if isinstance(entry, str) else entry["source"]


def make_job(family: Path, work: Path) -> dict:
    """Unpack each package of the family and list its weights and test tensors (from its rdf.yaml)."""
    manifest = yaml.safe_load((family / "family.yaml").read_text())
    packages = {}
    for kind, entry in manifest["packages"].items():
        zip_path = family / entry["file"]
        folder = work / "packages" / kind
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(folder)
        rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
        packages[kind] = {
            "zip": str(zip_path),
            "weights": {fmt: str(folder / _source(w)) for fmt, w in rdf["weights"].items()
                        if fmt in ("onnx", "torchscript")},
            "inputs": [[t["id"], str(folder / _source(t["test_tensor"]))] for t in rdf["inputs"]],
            "outputs": [[t["id"], str(folder / _source(t["test_tensor"]))] for t in rdf["outputs"]],
        }
    return {"packages": packages}


def _labels(kind: str, maps: np.ndarray, original_shape) -> np.ndarray:
    from usam_bioimageio.automatic.ais.postprocess import instances_from_maps
    from usam_bioimageio.automatic.ais.decoder import maps_to_original

    maps = np.asarray(maps, np.float32)[0]
    if kind == "ais_head":
        maps = maps_to_original(maps, original_shape)
    return instances_from_maps(maps)


@lru_cache(maxsize=None)
def _reference_labels(kind: str, ref_file: str, original_shape: tuple) -> np.ndarray:
    """The labels of a package's test outputs: the same for every runtime, so computed once."""
    return _labels(kind, np.load(ref_file), original_shape)


def compare(job: dict, out: Path, name: str, formats) -> dict:
    """Per package: ok, max_abs, and why not; per weight format where a runtime runs several."""
    results = {}
    image_shape = None
    if "image_encoder" in job["packages"]:
        image_shape = np.load(job["packages"]["image_encoder"]["inputs"][0][1], mmap_mode="r").shape[-2:]
    for kind, package in job["packages"].items():
        per_format = {}
        for fmt in formats:
            if fmt not in package["weights"]:
                continue
            r = {"ok": False, "max_abs": float("nan")}
            err = out / f"{kind}.{fmt}.error"
            core = out / f"{kind}.{fmt}.core.json"
            if err.exists():
                r["error"] = err.read_text().strip().splitlines()[-1][:500]
                per_format[fmt] = r
                continue
            diffs, labels_equal, missing = [], True, []
            for tensor, ref_file in package["outputs"]:
                got_file = out / f"{kind}.{fmt}.{tensor}.npy"
                if not got_file.exists():
                    missing.append(tensor)
                    continue
                ref, got = np.load(ref_file), np.load(got_file)
                if got.shape != ref.shape:
                    r["error"] = f"{tensor}: shape {got.shape}, expected {ref.shape}"
                    diffs.append(float("inf"))
                    continue
                diffs.append(float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))))
                if kind in AIS_KINDS:
                    labels_equal &= bool(np.array_equal(_labels(kind, got, image_shape),
                                                        _reference_labels(kind, ref_file, tuple(image_shape))))
            if missing:
                r["error"] = f"no output {missing}"
            r["max_abs"] = max(diffs) if diffs else float("nan")
            r["ok"] = not missing and bool(diffs) and r["max_abs"] <= TOLERANCE and labels_equal
            if kind in AIS_KINDS:
                r["labels_equal"] = labels_equal
            if core.exists():
                test = json.loads(core.read_text())
                r["test_model"] = test["status"]
                r["ok"] &= test["status"] == "passed"
                if test["status"] != "passed":
                    r["error"] = "; ".join(test["errors"])[:500] or "test_model failed"
            per_format[fmt] = r
        if not per_format:
            continue
        worst = max(v["max_abs"] if np.isfinite(v["max_abs"]) else float("inf") for v in per_format.values())
        results[kind] = {"ok": all(v["ok"] for v in per_format.values()), "max_abs": worst}
        if len(per_format) > 1:
            results[kind]["formats"] = per_format
        else:
            results[kind].update({k: v for k, v in next(iter(per_format.values())).items() if k not in ("ok", "max_abs")})
    return results


def run_runtime(name: str, job_file: Path, job: dict, work: Path, quick: bool = False) -> dict:
    formats, command = RUNTIMES[name]
    if quick and name.startswith("core-"):  # CI: the ONNX weights (torchscript runs in the torch runtimes)
        formats = ("onnx",)
    env_dir = hosts_dir() / name
    out = work / "outputs" / name
    if not (env_dir / ".ready").exists():
        return {kind: {"ok": False, "max_abs": float("nan"), "error": f"environment {env_dir} not installed "
                       "(bash scripts/host_envs.sh)"} for kind in job["packages"]}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    if name == "ort-1.13.1":
        env["NODE_PATH"] = str(env_dir / "node_modules")
    # ONNX Runtime: the default session options (what a host has), and without --quick every graph
    # optimisation level too (the graphs must not need an optimiser's rewrite, nor break under one)
    levels = [None] + (list(OPT_LEVELS) if name.startswith("ort-") and not quick else [])
    results: dict = {}
    for level in levels:
        level_out = out if level is None else out.with_name(f"{name}@{level}")
        args = command(env_dir) + [str(job_file), str(level_out)] + ([level] if level else [])
        if name.startswith("core-"):  # each format predicted and tested with test_model
            # CI (--quick): test_model in BioEngine's pinned core only; the newest core predicts (test_model
            # runs each package three more times, at every parameterised size: the check's largest cost)
            tested = "-" if quick and name != GATE_RUNTIME else ",".join(formats)
            args += [",".join(formats), tested]
        proc = subprocess.run(args, env=env, cwd=work, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {kind: {"ok": False, "max_abs": float("nan"),
                           "error": f"runner exited {proc.returncode} (level {level or 'default'}): {tail[0]}"}
                    for kind in job["packages"]}
        found = compare(job, level_out, name, formats)
        if level is None:
            results = found
            continue
        for kind, r in found.items():
            results[kind].setdefault("levels", {})[level] = {"ok": r["ok"], "max_abs": r["max_abs"]}
            results[kind]["ok"] &= r["ok"]
            results[kind]["max_abs"] = max(results[kind]["max_abs"], r["max_abs"])
    return results


def version_of(name: str) -> str:
    """The runtime version actually installed in an environment."""
    env_dir = hosts_dir() / name
    probes = {
        "ort": "import onnxruntime as m; print(m.__version__)",
        "torch": "import torch as m; print(m.__version__)",
        "spec": "import bioimageio.spec as m; print(m.__version__)",
        "core": "import importlib.util as u, bioimageio.core as m, bioimageio.spec as s, onnxruntime as o; "
                "t = u.find_spec('torch') and __import__('torch'); "
                "print(m.__version__, 'spec', s.__version__, 'onnxruntime', o.__version__, 'torch', "
                "t.__version__ if t else 'none (--quick)')",
    }
    if name == "ort-1.13.1":
        pkg = env_dir / "node_modules" / "onnxruntime-node" / "package.json"
        return json.loads(pkg.read_text())["version"] + " (onnxruntime-node)" if pkg.exists() else "missing"
    python = env_dir / "python" if name == "torch-1.13" else env_dir / "bin" / "python"
    proc = subprocess.run([str(python), "-c", probes[name.split("-")[0]]], capture_output=True, text=True)
    return proc.stdout.strip() or "missing"


def table(report: dict) -> str:
    kinds = sorted({k for r in report["runtimes"].values() for k in r})
    rows = ["| runtime | version | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for name, res in report["runtimes"].items():
        cells = []
        for k in kinds:
            r = res.get(k)
            cells.append("-" if r is None else f"{'pass' if r['ok'] else 'FAIL'} {r['max_abs']:.1e}")
        rows.append(f"| {name} | {report['versions'].get(name, '')} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", type=Path, help="a family folder (default: export a seeded vit_t family)")
    parser.add_argument("--runtimes", nargs="+", choices=list(RUNTIMES),
                        help="default: all (with --quick: the QUICK_RUNTIMES)")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "hosts.json")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--jobs", type=int, default=2, help="runtimes checked side by side (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help="CI: bioimageio.core predicts the ONNX weights only, and runs test_model in "
                             f"{GATE_RUNTIME} only; the export without pytorch_state_dict weights")
    args = parser.parse_args(argv)
    args.runtimes = args.runtimes or list(QUICK_RUNTIMES if args.quick else RUNTIMES)
    with tempfile.TemporaryDirectory(prefix="usam-hosts-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        family = args.family.resolve() if args.family else export_test_family(work, quick=args.quick)
        export_s = time.perf_counter() - t0
        job = make_job(family, work)
        job_file = work / "job.json"
        job_file.write_text(json.dumps(job, indent=1))
        report = {"runtimes": {}, "versions": {}, "seconds": {}, "tolerance_max_abs": TOLERANCE,
                  "family": "seeded vit_t + AIS decoder" if not args.family else str(args.family),
                  "packages": sorted(job["packages"]), "export_seconds": round(export_s, 1),
                  "host": f"{platform.machine()}, {os.cpu_count()} cores", "quick": args.quick}
        def check(name: str):
            print(f"host check: {name} ...", file=sys.stderr, flush=True)
            t1 = time.perf_counter()
            result = version_of(name), run_runtime(name, job_file, job, work, quick=args.quick)
            return result + (round(time.perf_counter() - t1, 1),)

        # runtimes side by side: much of a run is single-threaded (imports, session set-up, the comparison)
        t1 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            done = dict(zip(args.runtimes, pool.map(check, args.runtimes)))
        for name in args.runtimes:  # in the order asked for
            report["versions"][name], report["runtimes"][name], report["seconds"][name] = done[name]
        report["seconds_all_runtimes"] = round(time.perf_counter() - t1, 1)
        report["jobs"] = args.jobs
        report["descriptions"] = {}
        for name in PARSERS:
            report["versions"][name] = version_of(name)
            report["descriptions"][name] = run_parser(name, job_file, job, work)
    report["all_ok"] = all(r["ok"] for group in ("runtimes", "descriptions") for res in report[group].values()
                           for r in res.values())
    print(table(report))
    for name, res in report["descriptions"].items():
        print(f"{name} ({report['versions'][name]}): " + ", ".join(f"{k} {r['status']}" for k, r in res.items()))
    for name, res in list(report["runtimes"].items()) + list(report["descriptions"].items()):
        for kind, r in res.items():
            if not r["ok"]:
                print(f"{name} / {kind}: {r.get('error') or json.dumps(r.get('formats', r))}")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    tmp_report = args.report.with_name(args.report.name + ".part")
    tmp_report.write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
    os.replace(tmp_report, args.report)
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
