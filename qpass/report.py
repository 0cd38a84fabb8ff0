"""The compile report: per-layer SQNR against the float model, kernels ONNX Runtime will run."""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qpass.calibration import Context
from qpass.files import write_atomically
from qpass.graph import is_op, module_path
from qpass.metadata import QUANTIZES, SENSITIVITY, SMOOTHQUANT_MULS, UNFUSED
from qpass.passes.insert_qdq import QUANTIZABLE_OPS
from qpass.runtime import onnxruntime as ort_runtime


@dataclasses.dataclass
class LayerError:
    """Quantization error of one quantized op's output, as the next layer sees it."""

    op_type: str
    node: str
    tensor: str
    sqnr_db: float
    source: str
    """The layer's name in the model it came from (`layer_source`): a torch module path such as
    "_blocks.3._project_conv" for a captured module, else the ONNX node name."""


@dataclasses.dataclass
class Report:
    layers: list[LayerError]
    outputs: dict[str, float]
    kernels: dict[str, int]
    unfused: list[str]
    smoothquant_muls: list[str] = dataclasses.field(default_factory=list)
    sensitivity: list[tuple[str, float, bool]] = dataclasses.field(default_factory=list)

    @classmethod
    def measure(cls, float_model: bytes, model: ir.Model, context: Context) -> Report:
        """Run float and quantized models on the calibration data; accumulate SQNR per layer."""
        pairs = _compared_tensors(model)
        outputs = [v.name for v in model.graph.outputs]
        float_names = list(dict.fromkeys([f for _, f, _ in pairs] + outputs))
        quant_names = list(dict.fromkeys([q for _, _, q in pairs] + outputs))
        signal: dict[str, float] = {}
        noise: dict[str, float] = {}
        quantized = ir.to_proto(model).SerializeToString()
        floats = context.run(float_model, float_names, "report")
        quants = context.run(quantized, quant_names, progress=False)
        for f_out, q_out in zip(floats, quants, strict=True):
            for key, f_name, q_name in [(q, f, q) for _, f, q in pairs] + [
                (o, o, o) for o in outputs
            ]:
                reference = f_out[f_name].astype(np.float64)
                signal[key] = signal.get(key, 0.0) + float(np.sum(reference**2))
                noise[key] = noise.get(key, 0.0) + float(np.sum((reference - q_out[q_name]) ** 2))
        layers = [
            LayerError(node.op_type, node.name, f, _db(signal[q], noise[q]), layer_source(node))
            for node, f, q in pairs
        ]
        return cls(
            layers=layers,
            outputs={o: _db(signal[o], noise[o]) for o in outputs},
            kernels=ort_runtime.optimized_op_types(quantized),
            unfused=list(model.meta.get(UNFUSED, [])),
            smoothquant_muls=list(model.meta.get(SMOOTHQUANT_MULS, [])),
            sensitivity=list(model.meta.get(SENSITIVITY, [])),
        )

    def worst(self, n: int = 10) -> list[LayerError]:
        return sorted(self.layers, key=lambda r: r.sqnr_db)[:n]

    def table(self) -> str:
        width = max([len(r.source) for r in self.layers] + [6])
        lines = [f"{'op':<18} {'source':<{width}} {'SQNR dB':>8}"]
        lines += [
            f"{r.op_type:<18} {r.source:<{width}} {r.sqnr_db:8.2f}" for r in self.layers
        ]
        lines += [f"{'output':<18} {name:<{width}} {db:8.2f}" for name, db in self.outputs.items()]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        kernels = ", ".join(f"{k} x{v}" for k, v in self.kernels.items())
        rows = "\n".join(
            f"| {r.op_type} | `{r.source}` | `{r.node}` | `{r.tensor}` "
            f"| {r.sqnr_db:.2f} |"
            for r in self.layers
        )
        outs = "\n".join(f"| `{k}` | {v:.2f} |" for k, v in self.outputs.items())
        unfused = "\n".join(f"- {u}" for u in self.unfused) or "- none"
        return (
            f"# qpass report\n\n## Model outputs (SQNR dB vs float)\n\n| output | SQNR dB |\n"
            f"|---|---|\n{outs}\n\n## ONNX Runtime kernels\n\n{kernels}\n\n"
            f"## Ops that will not fuse\n\n{unfused}\n\n## Per-layer SQNR (dB)\n\n"
            f"| op | source | node | tensor | SQNR dB |\n|---|---|---|---|---|\n{rows}\n"
        ) + _extra_markdown(self)

    def to_html(self) -> str:
        body = _html_body(self)
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>qpass report</title>"
            f"<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}"
            f"table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px}}"
            f"</style></head><body>{body}</body></html>"
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def save(self, path: str | Path) -> Path:
        """Write the report as .html, .md or .json (by the file's suffix), atomically."""
        path = Path(path)
        text = {".html": self.to_html, ".htm": self.to_html, ".json": self.to_json}.get(
            path.suffix.lower(), self.to_markdown
        )()
        return write_atomically(path, text.encode())


def _compared_tensors(model: ir.Model) -> list[tuple[ir.Node, str, str]]:
    """(node, float tensor, quantized tensor) for each quantized op's output."""
    pairs = []
    for node in model.graph:
        if not is_op(node, *QUANTIZABLE_OPS) or not _reads_dequantized(node):
            continue
        out = node.outputs[0]
        q = out.consumers()[0] if len(out.consumers()) == 1 else None
        dq = q.outputs[0].consumers() if is_op(q, "QuantizeLinear") else []
        if dq and is_op(dq[0], "DequantizeLinear") and QUANTIZES in dq[0].metadata_props:
            pairs.append((node, dq[0].metadata_props[QUANTIZES], dq[0].outputs[0].name))
        elif not is_op(q, "QuantizeLinear"):
            pairs.append((node, out.name, out.name))
    return pairs


def layer_source(node: ir.Node) -> str:
    """The name of `node`'s layer in the model it came from: for a node torch's exporter
    captured, the path of the module that owns its weight, or of the module it ran in; else the
    ONNX node name.

    The weight's owner is preferred because a BatchNorm folded at export lends the Conv its own
    module scope ("_blocks.3._bn2"), while the weight keeps its parameter name
    ("_blocks.3._project_conv.weight", read through a DequantizeLinear once quantized).
    """
    path = module_path(node)
    if not path:
        return node.name
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    producer = weight.producer() if weight is not None else None
    if is_op(producer, "DequantizeLinear"):
        weight = producer.inputs[0]
    name = weight.name if weight is not None and weight.name else ""
    owner, found, _ = name.partition(".weight")
    if found and owner and path.startswith(owner.rpartition(".")[0]):
        return owner
    return path


def _reads_dequantized(node: ir.Node) -> bool:
    return any(v is not None and is_op(v.producer(), "DequantizeLinear") for v in node.inputs)


def sqnr_db(reference: np.ndarray, value: np.ndarray) -> float:
    """10 log10(Σ reference² / Σ (reference - value)²) in dB; inf when they are equal."""
    reference = reference.astype(np.float64)
    return _db(float(np.sum(reference**2)), float(np.sum((reference - value) ** 2)))


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(max(signal, 1e-30) / noise))


def _bar_chart(rows: list[LayerError]) -> str:
    """An inline SVG bar chart of the layers with the lowest SQNR."""
    finite = [r for r in rows if np.isfinite(r.sqnr_db)]
    if not finite:
        return ""
    top = max(r.sqnr_db for r in finite) or 1.0
    bar_h, label_w, width = 18, 260, 420
    parts = []
    for i, r in enumerate(finite):
        y = i * bar_h
        w = max(1.0, width * r.sqnr_db / top)
        parts.append(
            f"<text x='0' y='{y + 13}' font-size='11'>{html.escape(r.source[-40:])}"
            "</text>"
            f"<rect x='{label_w}' y='{y + 2}' width='{w:.1f}' height='{bar_h - 4}' fill='#c44'/>"
            f"<text x='{label_w + w + 4:.1f}' y='{y + 13}' font-size='11'>{r.sqnr_db:.1f} dB</text>"
        )
    height = bar_h * len(finite)
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{label_w + width + 80}' "
        f"height='{height}'>{''.join(parts)}</svg>"
    )


def _html_body(report: Report) -> str:
    esc = html.escape
    outs = "".join(f"<tr><td>{esc(k)}</td><td>{v:.2f}</td></tr>" for k, v in report.outputs.items())
    kernels = "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in report.kernels.items())
    rows = "".join(
        f"<tr><td>{esc(r.op_type)}</td><td>{esc(r.source)}</td><td>{esc(r.node)}</td>"
        f"<td>{esc(r.tensor)}</td>"
        f"<td>{r.sqnr_db:.2f}</td></tr>"
        for r in report.layers
    )
    unfused = "".join(f"<li>{esc(u)}</li>" for u in report.unfused) or "<li>none</li>"
    return (
        f"<h1>qpass report</h1><h2>Model outputs (SQNR dB vs float)</h2>"
        f"<table><tr><th>output</th><th>SQNR dB</th></tr>{outs}</table>"
        f"<h2>Worst layers</h2>{_bar_chart(report.worst(15))}"
        f"<h2>ONNX Runtime kernels</h2><table><tr><th>kernel</th><th>count</th></tr>"
        f"{kernels}</table><h2>Ops that will not fuse</h2><ul>{unfused}</ul>"
        f"<h2>Per-layer SQNR</h2><table><tr><th>op</th><th>source</th><th>node</th><th>tensor</th>"
        f"<th>SQNR dB</th></tr>{rows}</table>{_extra_html(report)}"
    )


def _extra_markdown(report: Report) -> str:
    """Sections that exist only when a pass recorded their data (SmoothQuant, mixed precision)."""
    text = ""
    if report.smoothquant_muls:
        muls = "\n".join(f"- `{m}`" for m in report.smoothquant_muls)
        text += f"\n## SmoothQuant: explicit Mul (no producer absorbed 1/s)\n\n{muls}\n"
    if report.sensitivity:
        rows = "\n".join(
            f"| `{n}` | {db:.2f} | {'float' if kept else 'int8'} |"
            for n, db, kept in report.sensitivity
        )
        text += (
            "\n## Layer sensitivity (output SQNR dB with only that layer quantized)\n\n"
            f"| node | SQNR dB | kept |\n|---|---|---|\n{rows}\n"
        )
    return text


def _extra_html(report: Report) -> str:
    esc = html.escape
    text = ""
    if report.smoothquant_muls:
        items = "".join(f"<li>{esc(m)}</li>" for m in report.smoothquant_muls)
        text += f"<h2>SmoothQuant: explicit Mul (no producer absorbed 1/s)</h2><ul>{items}</ul>"
    if report.sensitivity:
        rows = "".join(
            f"<tr><td>{esc(n)}</td><td>{db:.2f}</td><td>{'float' if kept else 'int8'}</td></tr>"
            for n, db, kept in report.sensitivity
        )
        text += (
            "<h2>Layer sensitivity (output SQNR dB with only that layer quantized)</h2>"
            f"<table><tr><th>node</th><th>SQNR dB</th><th>kept</th></tr>{rows}</table>"
        )
    return text
