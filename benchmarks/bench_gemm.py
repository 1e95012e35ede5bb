"""The host's fp32 GEMM throughput: numpy, torch and ONNX Runtime on a ViT-B MLP-sized product, in one run.

Why: the encoder and decoder are GEMM-bound, so their speed-ups over eager torch are bounded by how much
faster ONNX Runtime's GEMM is than torch's on the host. Prints a Markdown section (``--out FILE`` appends it).
Usage: .venv/bin/python benchmarks/bench_gemm.py [--threads 2] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

M, K, N = 4096, 768, 3072  # tokens x width x MLP width of vit_b


def _rate(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 2 * M * K * N / min(times) / 1e9


def gemm_rates(threads: int) -> dict:
    """GFLOP/s of numpy, torch and ONNX Runtime (constant weights) on the product, ``threads`` threads."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = rng.random((M, K), dtype=np.float32)
    b = rng.random((K, N), dtype=np.float32)
    torch.set_num_threads(threads)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])],
                              [numpy_helper.from_array(b, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return {"numpy": _rate(lambda: a @ b), "torch": _rate(lambda: ta @ tb),
            "onnxruntime (constant weights)": _rate(lambda: session.run(None, {"x": a}))}


def cpu_description() -> str:
    """The CPU's model name and which of AVX2 / AVX-512 / BF16 / AMX it has."""
    try:
        cpu = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine()
    flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in cpu) or "none"
    name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name")), "")
    return f"{name}; AVX2 / AVX-512 / BF16 / AMX flags present: {flags}"


def section(rates: dict, threads: int) -> str:
    rows = [f"| {k} | {v:.0f} |" for k, v in rates.items()]
    return (f"\n## fp32 GEMM throughput of this host ({time.strftime('%Y-%m-%d %H:%M')})\n\n"
            f"`benchmarks/bench_gemm.py`: ({M} x {K}) @ ({K} x {N}), {threads} threads, best of 5. CPU: "
            f"{cpu_description()}.\n\n| library | GFLOP/s |\n|---|---|\n" + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    text = section(gemm_rates(args.threads), args.threads)
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
