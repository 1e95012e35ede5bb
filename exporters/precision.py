"""Reduced-precision image encoders (issue 16): a family's fp32 encoder as int8 (dynamic quantisation of the
ViT's MatMuls) or fp16 (the ViT in float16, the exact preprocessing kept in float32 / float64), each a package of
its own next to the family's packages and never the default.

A variant holds ONNX weights only, its own test outputs (computed by ONNX Runtime from the variant) and, in
``config.usam``, ``precision`` and ``reference_identity`` (the fp32 encoder's identity): the runtime gives its
embeddings the identity ``<reference>+<precision>``, so the family's decoders take them and caches keep them
apart. ``family.yaml`` lists it under ``variants.image_encoder.<precision>``; ``SamModel.load(...,
encoder_precision="int8")`` / ``--encoder-precision int8`` use it. Its README states what it costs in quality
(``measurements``, from benchmarks/bench_precision.py).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import yaml

from usam_bioimageio.io.download import sha256_of
from usam_bioimageio.runtime.packages import FAMILY_FILE, load_package

from .writer import PackageTestError, format_summary, validate_package

PRECISIONS = ("int8", "fp16")
# the encoder package's ViT nodes ("/image_encoder/..."); the rest is the preprocessing, exact only in float32/64
VIT_NODE_PREFIX = "/image_encoder/"


def convert_onnx(src: Path, dst: Path, precision: str) -> None:
    """Write the ``precision`` variant of the encoder graph ``src`` to ``dst``."""
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # MatMul only: measured fastest, and quantising the convolutions made vit_t slower (measured-facts.md)
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    elif precision == "fp16":
        vit_to_float16(src, dst)
    else:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")


def vit_to_float16(src: Path, dst: Path) -> None:
    """Write ``src`` with its ViT nodes (``VIT_NODE_PREFIX``) in float16 and everything else untouched.

    onnxruntime.transformers.float16.convert_float_to_float16 with the preprocessing in its node block list
    is not usable here: measured, it ran the blocked preprocessing's resize MatMul in float16 (values up to
    255 x 49152 overflow to inf) and every embedding came out NaN. So, directly: the float32 initializers
    and constants used only by ViT nodes become float16, a Cast to float16 goes in front of every other
    float32 tensor a ViT node reads, a ViT Cast to float32 casts to float16 instead, and a Cast back to
    float32 after each ViT output of the graph (the inputs and outputs keep their float32 type).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.shape_inference.infer_shapes(onnx.load(str(src)))
    graph = model.graph
    in_vit = lambda node: node.name.startswith(VIT_NODE_PREFIX)  # noqa: E731
    from_vit = {o for n in graph.node if in_vit(n) for o in n.output}
    readers: Dict[str, set] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(in_vit(node))
    for out in graph.output:
        readers.setdefault(out.name, set()).add(False)
    dtype = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}

    def half(t: "onnx.TensorProto") -> "onnx.TensorProto":
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name)

    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and readers.get(init.name) == {True}:
            init.CopyFrom(half(init))
        dtype[init.name] = init.data_type

    nodes, casts = [], {}
    for node in graph.node:
        if in_vit(node):
            for k, name in enumerate(node.input):
                if name and name not in from_vit and dtype.get(name) == TensorProto.FLOAT:
                    if name not in casts:
                        casts[name] = f"{name}_fp16"
                        nodes.append(helper.make_node("Cast", [name], [casts[name]], to=TensorProto.FLOAT16,
                                                      name=f"{name}_to_fp16"))
                    node.input[k] = casts[name]
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16
                elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                    attr.t.CopyFrom(half(attr.t))
        nodes.append(node)
    renamed = {o.name: f"{o.name}_fp16" for o in graph.output
               if o.name in from_vit and dtype.get(o.name) == TensorProto.FLOAT}
    for node in nodes:
        node.output[:] = [renamed.get(o, o) for o in node.output]
        node.input[:] = [renamed.get(i, i) for i in node.input]
    for name, inner in renamed.items():
        nodes.append(helper.make_node("Cast", [inner], [name], to=TensorProto.FLOAT, name=f"{name}_to_fp32"))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # float16 now where shape inference said float32
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def _documentation(text: str, precision: str, measurements: Optional[Mapping]) -> str:
    what = {"int8": "int8: the ViT's matrix products dynamically quantised (weights int8 per tensor, activations "
                    "uint8 per call; ONNX Runtime's quantize_dynamic on MatMul)",
            "fp16": "fp16: the ViT in float16 (the preprocessing stays float32 / float64, so it is still exact)"}
    lines = [f"# Reduced precision: {precision}", "",
             f"This is the {what[precision]} variant of the family's fp32 image encoder. Its embeddings are close "
             "to the fp32 encoder's but not equal; the family's decoders take them. Never the default: "
             f"`usam ... --encoder-precision {precision}` or `SamModel.load(..., encoder_precision=\"{precision}\")`.",
             ""]
    if measurements:
        lines += ["Measured against the fp32 encoder (benchmarks/bench_precision.py):", "",
                  "| what | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in measurements.items()]
    else:
        lines += ["Not measured yet for this export: run benchmarks/bench_precision.py."]
    return "\n".join(lines) + "\n\n" + text


def write_encoder_variant(family_dir: Path, precision: str, *, measurements: Optional[Mapping] = None,
                          test: bool = True) -> Path:
    """Write ``image_encoder_<precision>.zip`` into the family folder ``family_dir`` (gated by bioimageio.core's
    test of its ONNX weights) and list it in family.yaml; returns its path. Nothing is changed if the test fails."""
    import onnxruntime as ort

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    family_dir = Path(family_dir)
    manifest_path = family_dir / FAMILY_FILE
    manifest = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
    entry = manifest["packages"]["image_encoder"]
    encoder = load_package(family_dir / entry["file"], sha256=entry.get("sha256"))
    if encoder.precision != "fp32":
        raise ValueError(f"{entry['file']} is already a {encoder.precision} variant")
    out = family_dir / f"image_encoder_{precision}.zip"
    work = Path(tempfile.mkdtemp(prefix=f".{out.stem}.", suffix=".tmp", dir=family_dir))
    try:
        files = work / "files"
        files.mkdir()
        rdf = copy.deepcopy(dict(encoder.rdf))
        weights = files / f"weights_{precision}.onnx"
        convert_onnx(encoder.weights_path("onnx"), weights, precision)
        (inp,), (outp,) = rdf["inputs"], rdf["outputs"]
        x = np.load(encoder.root / inp["test_tensor"]["source"])
        session = ort.InferenceSession(str(weights), providers=["CPUExecutionProvider"])
        (embeddings,) = session.run([outp["id"]], {inp["id"]: x})
        if not np.all(np.isfinite(embeddings)):
            raise ValueError(f"the {precision} encoder gives non-finite embeddings on the test image: not written")
        np.save(files / f"test_output_{outp['id']}.npy", embeddings)
        outp["test_tensor"] = {"source": f"test_output_{outp['id']}.npy",
                               "sha256": sha256_of(files / f"test_output_{outp['id']}.npy")}
        shutil.copyfile(encoder.root / inp["test_tensor"]["source"], files / inp["test_tensor"]["source"])
        for cover in rdf.get("covers", []):
            shutil.copyfile(encoder.root / cover, files / cover)
        doc = (encoder.root / rdf["documentation"]).read_text(encoding="utf-8")
        (files / rdf["documentation"]).write_text(_documentation(doc, precision, measurements), encoding="utf-8")
        onnx_entry = {k: v for k, v in rdf["weights"]["onnx"].items() if k != "parent"}
        rdf["weights"] = {"onnx": {**onnx_entry, "source": weights.name, "sha256": sha256_of(weights)}}
        rdf["name"] = f"{rdf['name']} ({precision})"
        rdf["description"] = (f"{precision} variant of the fp32 image encoder (not equal to it; measured loss in "
                              f"README). " + rdf["description"])
        rdf["tags"] = list(rdf.get("tags", [])) + [precision, "reduced-precision"]
        usam = rdf["config"]["usam"]
        usam["precision"], usam["reference_identity"] = precision, encoder.identity
        if measurements:
            usam["measured"] = {str(k): str(v) for k, v in measurements.items()}
        (files / "rdf.yaml").write_text("%YAML 1.2\n---\n" + yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True),
                                        encoding="utf-8")
        zip_path = work / out.name
        with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for f in sorted(files.iterdir()):
                zf.write(f, f.name)
        if test:
            summary = validate_package(zip_path)
            if not summary.passed:
                summary.source = str(out)
                raise PackageTestError(f"refusing to write {out}: bioimageio.core.test_model did not pass\n"
                                       + format_summary(summary), summary)
        os.replace(zip_path, out)
        manifest.setdefault("variants", {}).setdefault("image_encoder", {})[precision] = {
            "file": out.name, "sha256": sha256_of(out)}
        tmp_manifest = manifest_path.with_name(manifest_path.name + ".part")
        tmp_manifest.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
        os.replace(tmp_manifest, manifest_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def write_encoder_variants(family_dir: Path, precisions: Sequence[str], **kwargs) -> Dict[str, Path]:
    """:func:`write_encoder_variant` for each of ``precisions``."""
    return {p: write_encoder_variant(family_dir, p, **kwargs) for p in precisions}
