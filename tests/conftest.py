"""Shared fixtures: small random graphs and the real models from ../shared/data.

A test that reads the benchmark data (`benchmarks.data`) and finds none is skipped with the
loader's one-line reason (where the data comes from) instead of failing.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.data import DataNotFoundError  # noqa: E402  (needs ROOT on the path)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    """Tests, and the fixtures they set up, that load the benchmark data skip when it is
    missing."""
    try:
        return (yield)
    except DataNotFoundError as e:
        pytest.skip(str(e))


pytest_runtest_call = pytest_runtest_setup


def run_onnx(model: onnx.ModelProto | bytes, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    from qpass.runtime import onnxruntime as rt

    data = model if isinstance(model, bytes) else model.SerializeToString()
    return rt.session(data).run(None, feed)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    noise = np.sum((reference.astype(np.float64) - approx) ** 2)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / max(noise, 1e-30)))


def tiny_cnn(seed: int = 0, channels: int = 8, batchnorm: bool = True) -> onnx.ModelProto:
    """Conv-BN-Relu -> depthwise Conv-BN -> residual Add -> Clip(0,6) -> MaxPool -> GAP -> Gemm."""
    rng = np.random.default_rng(seed)
    c = channels
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def bn(x, out, n):
        if not batchnorm:
            nodes.append(helper.make_node("Identity", [x], [out]))
            return
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [
                    x,
                    const(f"{out}.g", rng.uniform(0.5, 1.5, n)),
                    const(f"{out}.b", rng.uniform(-1, 1, n)),
                    const(f"{out}.m", rng.uniform(-1, 1, n)),
                    const(f"{out}.v", rng.uniform(0.2, 2, n)),
                ],
                [out],
                epsilon=1e-5,
            )
        )

    nodes.append(
        helper.make_node(
            "Conv",
            [
                "input",
                const("w1", rng.normal(0, 0.3, (c, 3, 3, 3))),
                const("b1", rng.normal(0, 0.1, c)),
            ],
            ["c1"],
            pads=[1] * 4,
        )
    )
    bn("c1", "n1", c)
    nodes.append(helper.make_node("Relu", ["n1"], ["r1"]))
    nodes.append(
        helper.make_node(
            "Conv",
            ["r1", const("w2", rng.normal(0, 0.3, (c, 1, 3, 3)))],
            ["c2"],
            pads=[1] * 4,
            group=c,
        )
    )
    bn("c2", "n2", c)
    nodes.append(helper.make_node("Add", ["r1", "n2"], ["a"]))
    nodes.append(helper.make_node("Clip", ["a", const("lo", 0.0), const("hi", 6.0)], ["r2"]))
    nodes.append(helper.make_node("MaxPool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]))
    nodes.append(helper.make_node("GlobalAveragePool", ["p"], ["g"]))
    nodes.append(helper.make_node("Flatten", ["g"], ["f"]))
    nodes.append(
        helper.make_node(
            "Gemm",
            ["f", const("wf", rng.normal(0, 0.3, (10, c))), const("bf", rng.normal(0, 0.1, 10))],
            ["logits"],
            transB=1,
        )
    )
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def random_mlp(seed: int, trans_b: bool = False) -> onnx.ModelProto:
    """MatMul -> Add -> Relu -> Gemm on a 3-D input (the rows are tokens): Gemm(alpha=0.5), or
    Gemm(transB=1) with `trans_b`."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (24, 32)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, 32).astype(np.float32), "b1"),
        numpy_helper.from_array(
            rng.normal(0, 0.3, (8, 32) if trans_b else (32, 8)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([-1, 32], np.int64), "flat"),
    ]
    gemm = {"transB": 1} if trans_b else {"alpha": 0.5}
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["m"]),
        helper.make_node("Add", ["m", "b1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Reshape", ["r", "flat"], ["f"]),
        helper.make_node("Gemm", ["f", "w2"], ["out"], **gemm),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 6, 24])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def tiny_model() -> onnx.ModelProto:
    return tiny_cnn()


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder without write permission; skips as root, whom permissions do not bind."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        yield folder
    finally:
        folder.chmod(0o700)


@pytest.fixture
def tiny_calibration() -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(1).normal(0, 1, (32, 3, 16, 16)).astype(np.float32)}


@pytest.fixture(scope="session")
def real_models(tmp_path_factory):
    """EfficientNet-Lite0 and ResNet20 exported to ONNX with BatchNormalization kept."""
    torch = pytest.importorskip("torch")
    from benchmarks import models

    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for name, build, shape in (
        ("efficientnet_lite0", models.efficientnet_lite0, (1, 3, 224, 224)),
        ("resnet20", models.resnet20, (1, 3, 32, 32)),
    ):
        path = folder / f"{name}.onnx"
        models.export_onnx(build(), torch.zeros(shape), path, optimize=False)
        paths[name] = path
    return paths


@pytest.fixture
def workspace(tmp_path, tiny_model, tiny_calibration):
    """in/model.onnx, in/calib.npz, an empty out/."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    onnx.save(tiny_model, tmp_path / "in" / "model.onnx")
    np.savez(tmp_path / "in" / "calib.npz", **tiny_calibration)
    return tmp_path


def files(folder: Path) -> dict[str, str]:
    """Every file under `folder` (links included) -> a digest of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_refused(capsys, folder: Path, argv: list, message: str) -> None:
    """`qpass ARGV` on bad input: exit code 2, one line on stderr naming the problem (matching
    the regex `message`), no traceback, no file written or left behind under `folder`, and the
    bytes of every file there (the inputs) unchanged."""
    from qpass.cli import main

    before = files(folder)
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], err
    assert re.search(message, lines[0]), lines[0]
    assert files(folder) == before
