"""qpass.qat: LSQ and PACT gradients, prepare -> convert against the PTQ model, export equalities
after a short training, int8 fusion for ONNX Runtime and the TensorRT linter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from qpass.runtime.onnxruntime import optimized_op_types
from torch import nn

import qpass
import qpass.qat
from qpass.lint import lint_tensorrt
from qpass.qat.quantizers import ActivationQuantizer, round_ste


class TinyResNet(nn.Module):
    """conv-bn-relu, a residual block, global average pool, linear: ResNet20's ops in small."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.conv1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.conv2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 4)
        for bn in (self.stem[1], self.conv1[1], self.conv2[1]):
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    test = rng.standard_normal((64, 3, 8, 8)).astype(np.float32)
    return model, calib, test


def prepare(setup, preset, method="lsq", target="onnxruntime"):
    model, calib, _ = setup
    example = (torch.from_numpy(calib[:1]),)
    return qpass.qat.prepare(model, example, preset=preset, method=method, target=target,
                             calibration=calib, progress=False)


def initializers(compiled) -> dict[str, np.ndarray]:
    return {n: v.const_value.numpy() for n, v in compiled.model.graph.initializers.items()}


def test_lsq_step_gradient_matches_finite_differences():
    """LSQ's step gradient (Esser et al. 2020, eq. 3) is the derivative of s * clip(x/s + d)
    with the rounding residual d = round(x/s) - x/s held fixed (the straight-through
    estimator), times g = 1/sqrt(N Qp)."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, 5) * 2
    weights = torch.randn_like(x)
    quantizer = ActivationQuantizer(np.float32(0.02), np.uint8(128), 0, 255, "lsq", False)
    loss = (quantizer.dequantize(quantizer.quantize(x)) * weights).sum()
    loss.backward()
    s0 = quantizer.step.detach().double()
    xd, z = x.double(), 128.0
    residual = torch.round(xd / s0) - xd / s0

    def surrogate(s):
        return (s * torch.clamp(xd / s + residual, 0 - z, 255 - z) * weights.double()).sum()

    h = 1e-6
    finite = (surrogate(s0 + h) - surrogate(s0 - h)) / (2 * h)
    g = 1 / np.sqrt(x[0].numel() * 127)  # Qp: the levels above the zero point
    assert quantizer.step.grad.item() == pytest.approx(finite.item() * g, rel=1e-3)
    assert (x / 0.02 + 128 > 255).any() and (x / 0.02 + 128 < 0).any()  # both saturations hit


def test_pact_clipping_gradient():
    """PACT (Choi et al. 2018): d x^/d alpha = 1 where x > alpha, 0 elsewhere; the step the
    module holds is alpha / Qp, its gradient scaled so SGD moves alpha as PACT does."""
    torch.manual_seed(2)
    x = torch.randn(4, 8) * 3
    weights = torch.rand_like(x)
    quantizer = ActivationQuantizer(np.float32(0.02), np.uint8(0), 0, 255, "pact", False)
    assert quantizer.pacts
    (quantizer.dequantize(quantizer.quantize(x)) * weights).sum().backward()
    alpha = 0.02 * 255
    expected = weights[x > alpha].sum().item()  # finite differences of sum(w * clip(x, 0, a))
    h = 1e-4
    clip = lambda a: (weights.double() * torch.clamp(x.double(), 0, a)).sum().item()  # noqa: E731
    assert (clip(alpha + h) - clip(alpha - h)) / (2 * h) == pytest.approx(expected, rel=1e-3)
    assert quantizer.step.grad.item() * 255 == pytest.approx(expected, rel=1e-4)
    # the inputs below the clipping value pass straight through
    x.requires_grad_(True)
    quantizer.dequantize(quantizer.quantize(x)).sum().backward()
    assert torch.equal(x.grad, ((x > 0) & (x < alpha)).float())


def test_round_ste_rounds_half_to_even_like_quantize_linear():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0] * 4


@pytest.mark.parametrize("preset", ["int8", "w4a4", "w3a3"])
def test_prepare_then_convert_equals_the_ptq_model(setup, preset):
    model, calib, test = setup
    qat = prepare(setup, preset, "pact" if preset == "w3a3" else "lsq")
    converted = qpass.qat.convert(qat)
    ptq = qpass.compile(model, preset=preset, calibration=calib,
                        example_inputs=(torch.from_numpy(calib[:1]),), progress=False)
    ours, theirs = initializers(converted), initializers(ptq)
    assert ours.keys() == theirs.keys()
    for name, array in theirs.items():
        np.testing.assert_array_equal(ours[name], array, err_msg=name)
    np.testing.assert_array_equal(converted.run({"input": test})[0],
                                  ptq.run({"input": test})[0])
    with torch.no_grad():
        torch_out = qat(torch.from_numpy(test)).numpy()
    if preset != "int8":  # simulated in float by ONNX Runtime: the same float computation
        np.testing.assert_allclose(torch_out, ptq.run({"input": test})[0], atol=1e-4)


def test_w3a3_keeps_the_edge_layers_at_8_bits(setup):
    qat = prepare(setup, "w3a3")
    graph = qat.compiled.model.graph
    weights = [v.const_value.numpy() for n, v in graph.initializers.items()
               if n.endswith("weight_quantized")]
    first, *middle, last = weights
    assert first.dtype == np.int8 and last.dtype == np.int8
    for w in middle:
        values = w.astype(np.int32)
        assert values.min() >= -4 and values.max() <= 3
    narrow = [q for q in qat.activations.values() if q.qmax - q.qmin == 7]
    assert narrow, "the 3-bit activations are clamped to 8 levels"


def training_data(setup, steps=20):
    rng = np.random.default_rng(3)
    return [torch.from_numpy(rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
            for _ in range(steps)]


@pytest.mark.parametrize("method", ["lsq", "lsq+", "pact"])
def test_trained_module_and_export_are_the_same_numbers(setup, method):
    model, _, test = setup
    qat = prepare(setup, "w4a4", method)
    before = {k: v.detach().clone() for k, v in qat.state_dict().items()}
    losses = qpass.qat.fit(qat, training_data(setup), teacher=model, epochs=2, lr=1e-3,
                           progress=False)
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert any(not torch.equal(before[k], v) for k, v in qat.state_dict().items())
    converted = qpass.qat.convert(qat)
    stored = initializers(converted)
    for name, key in qat.keys.items():
        if key in qat.weights:
            np.testing.assert_array_equal(
                qat.weights[key].integers().detach().numpy(), stored[name].astype(np.float32)
            )
            scale_name = converted.model.graph.initializers[name].consumers()[0].inputs[1].name
            np.testing.assert_array_equal(qat.weights[key].scale().numpy(),
                                          stored[scale_name].reshape(-1))
    with torch.no_grad():
        torch_out = qat(torch.from_numpy(test)).numpy()
    onnx_out = converted.run({"input": test})[0]
    np.testing.assert_allclose(torch_out, onnx_out, atol=1e-4)
    assert (torch_out.argmax(1) == onnx_out.argmax(1)).all()


def test_int8_qat_fuses_as_int8_ptq(setup):
    model, _, test = setup
    qat = prepare(setup, "int8")
    qpass.qat.fit(qat, training_data(setup, 10), teacher=model, lr=1e-3, progress=False)
    converted = qpass.qat.convert(qat)
    ptq = qat.compiled
    assert any(not np.array_equal(a, initializers(ptq)[n]) for n, a in
               initializers(converted).items()), "training changed something"
    ours = optimized_op_types(converted.to_bytes()).get("QLinearConv", 0)
    assert ours == optimized_op_types(ptq.to_bytes()).get("QLinearConv", 0) == 3
    # the module computes ONNX Runtime's QLinearConv/QLinearAdd requantization (kernels.py)
    with torch.no_grad():
        torch_out = qat(torch.from_numpy(test)).numpy()
    np.testing.assert_allclose(torch_out, converted.run({"input": test})[0], atol=1e-4)
    qat.integer_kernels = False  # the float Q/DQ computation rounds differently in places
    with torch.no_grad():
        float_out = qat(torch.from_numpy(test)).numpy()
    assert np.abs(float_out - torch_out).max() < 0.1 * np.abs(torch_out).max()


def test_tensorrt_qat_export_is_lint_clean(setup):
    model, _, test = setup
    qat = prepare(setup, "int8", target="tensorrt")
    qpass.qat.fit(qat, training_data(setup, 10), teacher=model, lr=1e-3, progress=False)
    converted = qpass.qat.convert(qat, target="tensorrt")
    assert not [f for f in lint_tensorrt(converted.model) if f.severity == "error"]
    with torch.no_grad():
        torch_out = qat(torch.from_numpy(test)).numpy()
    onnx_out = converted.run({"input": test})[0]
    assert np.abs(torch_out - onnx_out).max() < 0.1 * np.abs(onnx_out).max()


def test_bad_input_is_one_line(setup):
    model, calib, _ = setup
    example = (torch.from_numpy(calib[:1]),)
    with pytest.raises(qpass.QpassError, match="method 'dorefa' is unknown"):
        qpass.qat.prepare(model, example, method="dorefa", calibration=calib)
    with pytest.raises(qpass.QpassError, match="needs calibration data"):
        qpass.qat.prepare(model, example)
    qat = prepare(setup, "w4a4")
    with pytest.raises(qpass.QpassError, match="prepared for onnxruntime, not tensorrt"):
        qpass.qat.convert(qat, target="tensorrt")
    with pytest.raises(qpass.QpassError, match="labels in the batches, or a teacher"):
        qpass.qat.fit(qat, training_data(setup, 1), progress=False)
