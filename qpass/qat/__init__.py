"""Quantization-aware training that exports the same Q/DQ graph as the presets.

    qat = qpass.qat.prepare(model, (example,), preset="w4a4", calibration=calib, method="lsq")
    qpass.qat.fit(qat, loader, teacher=model, epochs=1, lr=0.01)   # or any torch training loop
    compiled = qpass.qat.convert(qat)                              # a qpass.CompiledModel

`prepare` compiles the float model with the preset (post-training quantization) and runs the
compiled graph in torch with trainable integers, steps and zero points; `convert` writes the
trained values back into that graph, so the exported model and the trained module compute the
same numbers by construction. Methods: LSQ, LSQ+ and PACT (`qpass.qat.quantizers`).
"""

from qpass.qat.convert import convert
from qpass.qat.fit import fit
from qpass.qat.module import QATModule
from qpass.qat.prepare import prepare
from qpass.qat.quantizers import METHODS

__all__ = ["METHODS", "QATModule", "convert", "fit", "prepare"]
