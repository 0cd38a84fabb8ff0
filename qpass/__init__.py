"""qpass: a quantization compiler from float PyTorch/ONNX models to quantized ONNX."""

from qpass.calibration import CalibrationData, Context
from qpass.capture import capture
from qpass.compile import CompiledModel, compile
from qpass.errors import CalibrationError, LintError, ModelError, OutputError, QpassError
from qpass.schemes import QuantScheme

__all__ = [
    "CalibrationData",
    "CalibrationError",
    "CompiledModel",
    "Context",
    "LintError",
    "ModelError",
    "OutputError",
    "QpassError",
    "QuantScheme",
    "capture",
    "compile",
]
__version__ = "0.1.0"
