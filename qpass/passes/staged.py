"""The base of the calibrated weight-only passes that quantize stage by stage (GPTQ, AWQ)."""

from __future__ import annotations

import functools
import logging

import onnx_ir as ir

from qpass.calibration.staged import StagedCalibration
from qpass.passes.base import CalibratedPass
from qpass.passes.matmul_weights import (
    ensure_weight_opset,
    quantization_stages,
    untie_final_projection,
    weight_matmuls,
)
from qpass.schemes import QuantScheme


class StagedWeightPass(CalibratedPass):
    """Base of the calibrated weight-only passes (GPTQ, AWQ): the constant-weight MatMuls
    (`weight_matmuls`) are quantized stage by stage (`quantization_stages`), each stage from the
    statistics of a `StagedCalibration` run of the graph whose earlier stages are already
    quantized. Subclasses name themselves in `label` and implement `_quantize_stage`.

    `normalize_tokens`: each calibration token's input row x_t enters the statistics as
    x_t / ||x_t|| (`token_rows`), so the layer error they measure counts every token's output
    error relative to its magnitude, as the RMSNorm after the residual add will. Without it, a
    few tokens with massive activations (Sun et al. 2024, "Massive Activations in Large Language
    Models"; SmolLM2's are measured in docs/methods/weight-only.md) make E[xxᵀ] nearly rank one,
    and the weights are fitted to those tokens alone.
    """

    label = "weight quantization"

    def __init__(
        self, context, weights: QuantScheme, exclude, lm_head: bool, sequential: str,
        normalize_tokens: bool,
    ):
        super().__init__(context)
        if sequential not in ("block", "layer"):
            raise ValueError(f"sequential must be 'block' or 'layer', not {sequential!r}")
        self.weights = weights
        self.exclude = frozenset(exclude)
        self.lm_head = lm_head
        self.sequential = sequential
        self.normalize_tokens = normalize_tokens

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.lm_head:
            untie_final_projection(model.graph)
        targets = weight_matmuls(model.graph, self.exclude, self.lm_head)
        if not targets:
            return ir.passes.PassResult(model, modified=False)
        ensure_weight_opset(model)
        targets = weight_matmuls(model.graph, self.exclude, self.lm_head)  # rebuilt nodes
        stages = quantization_stages(targets, self.sequential)
        runner = StagedCalibration(self.context)
        for index, stage in enumerate(stages):
            description = f"{self.label} stage {index + 1}/{len(stages)}"
            self._quantize_stage(model, runner, stage, description)
        logging.getLogger(type(self).__module__).info(
            "%s quantized %d MatMul weights in %d stages", self.label, len(targets), len(stages)
        )
        return ir.passes.PassResult(model, modified=True)

    def _quantize_stage(self, model: ir.Model, runner, stage: list[ir.Node], description: str):
        raise NotImplementedError

    def _statistics(self, model, runner, stage, kind, description: str) -> dict:
        """{MatMul input name: kind(K, normalize_tokens)} streamed over the calibration set."""
        make = functools.partial(kind, normalize_tokens=self.normalize_tokens)
        return runner.statistics(model, stage, make, description)
