"""Fake quantizers with learned steps: LSQ, LSQ+ and PACT, in torch.

Each quantizer computes exactly what the graph's QuantizeLinear / DequantizeLinear compute
(round half to even, saturation at the integer range) in the forward pass; the methods differ
only in their gradients:

- LSQ (Esser et al. 2020, "Learned Step Size Quantization"): the step s is a parameter; with the
  straight-through estimator for the rounding, d x^/d s = round(x/s) - x/s inside the range and
  qmin - z or qmax - z where it saturates; that gradient is scaled by g = 1/sqrt(N * Qp)
  (N: elements sharing the step, Qp: the positive levels) so that steps and weights learn at
  comparable rates.
- LSQ+ (Bhalgat et al. 2020): LSQ with a learned offset for asymmetric activations; here the
  offset is the zero point z (rounded with the straight-through estimator, so that the graph's
  integer zero point holds it exactly; beta = -z s).
- PACT (Choi et al. 2018, "PACT: Parameterized Clipping Activation"): the clipping value
  alpha = (qmax - z) s is what is learned (held as s, see `ActivationQuantizer._s`);
  y = clip(x, lower, alpha) and the quantization of y passes gradients straight through,
  so d x^/d alpha = 1 where x > alpha, else 0 (the rounding term LSQ keeps is dropped).
"""

from __future__ import annotations

import math

import torch
from torch import nn

METHODS = ("lsq", "lsq+", "pact")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) (half to even, as QuantizeLinear) with the identity as its gradient."""
    return x + (torch.round(x) - x).detach()


def positive(step: torch.Tensor) -> torch.Tensor:
    """|step|, at least float32's smallest normal: an optimizer step past zero (a tiny
    per-channel step, a large learning rate) flips the sign of the parameter, not of the scale."""
    return step.abs().clamp_min(torch.finfo(torch.float32).tiny)


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x in the forward pass; its gradient multiplied by `factor` in the backward pass."""
    return (x - x * factor).detach() + x * factor


class WeightQuantizer(nn.Module):
    """A weight's latent float values and its per-channel (or per-tensor) step, by LSQ.

    `forward()` is the dequantized weight (q - z) s, q = clip(round(w/s) + z, qmin, qmax);
    `integers()` is q, what the graph stores.
    """

    def __init__(self, q, scale, zero, axis: int | None, qmin: int, qmax: int):
        super().__init__()
        shape = [1] * q.ndim
        if axis is not None and scale.ndim:
            shape[axis] = -1
        self.shape = shape
        self.qmin, self.qmax = qmin, qmax
        self.step = nn.Parameter(torch.as_tensor(scale, dtype=torch.float32).reshape(-1).clone())
        zero = torch.as_tensor(zero.astype("float32")).reshape(shape)
        self.register_buffer("zero", zero)
        self.weight = nn.Parameter((torch.as_tensor(q.astype("float32")) - zero) * self.s())
        channels = self.step.numel()
        self.grad_factor = 1.0 / math.sqrt(q.size / channels * max(qmax, 1))

    def s(self) -> torch.Tensor:
        return positive(self.step).reshape(self.shape)

    def scale(self) -> torch.Tensor:
        """The step as the graph stores it."""
        return positive(self.step).detach()

    def integers(self) -> torch.Tensor:
        s = scale_gradient(self.s(), self.grad_factor)
        return torch.clamp(round_ste(self.weight / s) + self.zero, self.qmin, self.qmax)

    def forward(self) -> torch.Tensor:
        s = scale_gradient(self.s(), self.grad_factor)
        return (self.integers() - self.zero) * s

    @torch.no_grad()
    def init_lsq_plus(self) -> None:
        """LSQ+'s weight step: max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1), per channel."""
        dims = [d for d, n in enumerate(self.shape) if n == 1] if self.step.numel() > 1 else None
        mean = self.weight.mean(dim=dims, keepdim=True)
        std = self.weight.std(dim=dims, keepdim=True)
        bound = torch.maximum((mean - 3 * std).abs(), (mean + 3 * std).abs())
        half_levels = (self.qmax - self.qmin + 1) / 2
        self.step.copy_(torch.clamp(bound / half_levels, min=1e-8).reshape(-1))


class ActivationQuantizer(nn.Module):
    """A per-tensor activation quantizer: `quantize` is QuantizeLinear (to integers held in
    float), `dequantize` is DequantizeLinear, with the method's gradients.

    `learn_zero`: LSQ+ learns the zero point (the offset) of a two-sided range; a one-sided range
    (z = qmin, e.g. after ReLU) keeps it, as LSQ+ initializes the offset there to the minimum 0.
    """

    def __init__(self, scale, zero, qmin: int, qmax: int, method: str, learn_zero: bool):
        super().__init__()
        self.method = method
        self.qmin, self.qmax = qmin, qmax
        zero = torch.as_tensor(float(zero))
        self.levels = max(qmax - float(zero), 1.0)  # Qp, the positive levels at the start
        self.register_buffer("fixed_zero", zero.clone())
        self.zero_param = nn.Parameter(zero.clone()) if learn_zero else None
        self.step = nn.Parameter(torch.tensor(float(scale), dtype=torch.float32))
        self.grad_factor = 1.0

    @property
    def pacts(self) -> bool:
        """PACT applies to one-sided ranges (clipped ReLU outputs); others are learned by LSQ."""
        return self.method == "pact" and float(self.fixed_zero) == self.qmin

    def zero(self) -> torch.Tensor:
        if self.zero_param is None:
            return self.fixed_zero
        return torch.clamp(round_ste(self.zero_param), self.qmin, self.qmax)

    def _s(self, x: torch.Tensor) -> torch.Tensor:
        """The step, its gradient scaled: PACT's parameter is alpha = Qp s, so SGD on s with
        the gradient times 1/Qp^2 takes PACT's steps on alpha (weight decay on s is the same
        as on alpha); LSQ scales by 1/sqrt(N Qp), N the features of one sample."""
        if self.pacts:
            return scale_gradient(positive(self.step), 1.0 / self.levels**2)
        if self.grad_factor == 1.0 and x.dim() > 1:
            self.grad_factor = 1.0 / math.sqrt(x[0].numel() * self.levels)
        return scale_gradient(positive(self.step), self.grad_factor)

    def scale(self) -> torch.Tensor:
        """The step as the graph stores it."""
        return positive(self.step).detach()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s, z = self._s(x), self.zero()
        if self.pacts:  # y = clip(x, lower, alpha); the rounding is straight-through
            y = torch.minimum(torch.maximum(x, (self.qmin - z) * s), (self.qmax - z) * s)
            return round_ste(y / s.detach()) + z
        return torch.clamp(round_ste(x / s) + z, self.qmin, self.qmax)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        s = self.scale() if self.pacts else self._s(q)
        return (q - self.zero()) * s


class BiasQuantizer(nn.Module):
    """An int32 bias at step s_x * s_w (the graph's rule): latent float values, rounded with the
    straight-through estimator; the step follows the two quantizers it is made of."""

    def __init__(self, q, scale, activation: ActivationQuantizer, weight: WeightQuantizer):
        super().__init__()
        self.activation, self.weight = [activation], [weight]  # not submodules: owned elsewhere
        self.bias = nn.Parameter(torch.as_tensor(q.astype("float64") * scale, dtype=torch.float32))

    def s(self) -> torch.Tensor:
        return self.activation[0].scale() * self.weight[0].scale()

    def integers(self) -> torch.Tensor:
        return round_ste(self.bias / self.s())

    def forward(self) -> torch.Tensor:
        return self.integers() * self.s()
