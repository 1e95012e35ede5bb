"""Packages that hosts run without our code: the host-conformance check (scripts/host_check.py) in CI, and the
properties of the written packages that hosts rely on (portable rdf.yaml, no machine paths, fixed ONNX shapes,
declared dependencies).

The check installs its environments with scripts/host_envs.sh --quick, in the background from the start of the run
(conftest), cached between runs under ~/.cache/usam-bioimageio/hosts; a runtime that cannot be installed fails
here, it is never skipped.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

import host_check  # scripts/ is on the path (conftest)
from conftest import host_envs_installed

ROOT = Path(__file__).resolve().parents[1]

KINDS = ("image_encoder", "prompt_decoder", "ais", "ais_head")


@pytest.fixture(scope="module")
def host_report(request, tmp_path_factory, vit_t_host_family):
    """The quick host check (CI profile) on the exported vit_t family with an AIS decoder."""
    host_envs_installed(request.config)  # installing since the start of the run (conftest)
    work = tmp_path_factory.mktemp("hosts")
    report_file = work / "hosts.json"
    host_check.main(["--quick", "--family", str(vit_t_host_family), "--work", str(work), "--report", str(report_file)])
    return json.loads(report_file.read_text())


@pytest.mark.hosts
@pytest.mark.parametrize("runtime", list(host_check.QUICK_RUNTIMES))
@pytest.mark.parametrize("kind", KINDS)
def test_package_runs_in_host(host_report, runtime, kind):
    result = host_report["runtimes"][runtime][kind]
    assert result["ok"], f"{kind} in {runtime} ({host_report['versions'][runtime]}): {result}"
    assert result["max_abs"] <= host_check.TOLERANCE
    if kind in host_check.AIS_KINDS:
        assert result.get("labels_equal", all(f["labels_equal"] for f in result.get("formats", {}).values()))


@pytest.mark.hosts
@pytest.mark.parametrize("kind", KINDS)
def test_bioengine_core_gates_every_package(host_report, kind):
    """CI's bioimageio.core gate: BioEngine's core runs test_model on every package (the AIS package too)."""
    assert host_report["runtimes"][host_check.GATE_RUNTIME][kind]["test_model"] == "passed"


@pytest.mark.hosts
@pytest.mark.parametrize("parser", list(host_check.PARSERS))
def test_descriptions_valid_for_newest_spec(host_report, parser):
    for kind in KINDS:
        assert host_report["descriptions"][parser][kind]["ok"], host_report["descriptions"][parser][kind]


def test_compare_flags_wrong_outputs(tmp_path):
    """The check can fail: a host output off by more than the tolerance, of another shape, or missing."""
    ref = np.linspace(0, 1, 12, dtype=np.float32).reshape(1, 3, 2, 2)
    np.save(tmp_path / "ref.npy", ref)
    job = {"packages": {"toy": {"weights": {"onnx": "x"}, "inputs": [], "outputs": [["y", str(tmp_path / "ref.npy")]]}}}
    out = tmp_path / "out"
    out.mkdir()
    np.save(out / "toy.onnx.y.npy", ref + 5e-5)
    assert host_check.compare(job, out, "rt", ("onnx",))["toy"]["ok"]
    np.save(out / "toy.onnx.y.npy", ref + 2e-4)
    assert not host_check.compare(job, out, "rt", ("onnx",))["toy"]["ok"]
    np.save(out / "toy.onnx.y.npy", ref[..., :1])
    assert "shape" in host_check.compare(job, out, "rt", ("onnx",))["toy"]["error"]
    (out / "toy.onnx.y.npy").unlink()
    assert not host_check.compare(job, out, "rt", ("onnx",))["toy"]["ok"]
    (out / "toy.onnx.error").write_text("Traceback...\nNOT_IMPLEMENTED: Could not find an implementation for Floor")
    assert "Floor" in host_check.compare(job, out, "rt", ("onnx",))["toy"]["error"]


# ---------------------------------------------------------------------------------------------------------
# what the written packages hold (the CI vit_t family: every weight format, gated by bioimageio.core)


def _packages(family: Path):
    manifest = yaml.safe_load((family / "family.yaml").read_text())
    return {kind: family / entry["file"] for kind, entry in manifest["packages"].items()}


def test_rdf_is_portable(vit_t_family):
    """rdf.yaml in the form bioimageio.spec 0.5.10 (bioimageio.core 0.10.4) and 0.5.12+ both read, no machine
    paths in any text file of a package, pytorch_state_dict weights with an environment naming this package."""
    from usam_exporters.writer import RDF_FORMAT_VERSION

    family, _ = vit_t_family
    for kind, path in _packages(family).items():
        with zipfile.ZipFile(path) as z:
            rdf = yaml.safe_load(z.read("rdf.yaml"))
            assert rdf["format_version"] == RDF_FORMAT_VERSION
            assert isinstance(rdf["documentation"], str) and rdf["documentation"] in z.namelist()
            assert rdf["covers"] and all(isinstance(c, str) and c in z.namelist() for c in rdf["covers"])
            for name in z.namelist():
                if name.endswith((".yaml", ".md", ".txt", ".json")):
                    text = z.read(name).decode("utf-8")
                    for machine_path in (str(ROOT.parent), "/tmp/", "/root/", "/home/"):
                        assert machine_path not in text, (kind, name, machine_path)
            deps = rdf["weights"]["pytorch_state_dict"]["dependencies"]
            env = yaml.safe_load(z.read(deps["source"]))
            pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
            assert any(r.startswith("usam-bioimageio") for r in pip), pip


def test_onnx_shapes_say_what_the_rdf_says(vit_t_family):
    """Every fixed axis of the description is fixed in the ONNX graph (e.g. the outputs' batch axis 1)."""
    import onnx

    family, _ = vit_t_family
    for kind, path in _packages(family).items():
        with zipfile.ZipFile(path) as z:
            rdf = yaml.safe_load(z.read("rdf.yaml"))
            graph = onnx.load_from_string(z.read(rdf["weights"]["onnx"]["source"])).graph
        values = {v.name: v for v in list(graph.input) + list(graph.output)}
        for tensor in rdf["inputs"] + rdf["outputs"]:
            dims = values[tensor["id"]].type.tensor_type.shape.dim
            for axis, d in zip(tensor["axes"], dims):
                size = len(axis["channel_names"]) if axis["type"] == "channel" else axis.get("size", None)
                if isinstance(size, int):
                    assert d.HasField("dim_value") and d.dim_value == size, (kind, tensor["id"], axis, d)
                else:
                    assert not d.HasField("dim_value"), (kind, tensor["id"], axis, d)
