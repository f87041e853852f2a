"""Muon (Jordan 2024; the optimizer of airbench94_muon.py in KellerJordan/cifar10-airbench) as an
MXNet optimizer, `--optimizer muon`.

Convolution filters (the 4-d weights) take Muon's step:

    buf    = muon_momentum * buf + grad                  (Nesterov: g = grad + muon_momentum * buf)
    weight = weight * sqrt(out_channels) / |weight|      (the filter bank renormalized every step)
    weight = weight - lr * muon_scale * NS(g)            (NS: g as an out x (in*kh*kw) matrix,
                                                          orthogonalized by Newton-Schulz)

NS is the quintic Newton-Schulz iteration of airbench94_muon (coefficients 3.4445, -4.7750, 2.0315,
3 steps, in float32 here): it maps the matrix's singular values to about 0.5-1.5 and keeps its
singular vectors, so every filter bank moves by the same relative amount whatever the scale of its
gradient. Weight decay does not apply to the filters (their norm is fixed). Every other parameter
(BatchNorm shifts, biases, the Dense head) takes MXNet's NAG step with `momentum`, unchanged.

The filters' step follows the run's LR schedule: `muon_scale` is the filters' peak LR divided by
the others' (RunConfig.muon_lr / effective_lr), so one schedule drives both.
"""
from __future__ import annotations

import math

import numpy as np

from vgg_gluon.runtime import import_mxnet

mx = import_mxnet()

#: airbench94_muon's quintic Newton-Schulz coefficients.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g, steps: int = 3, eps: float = 1e-7):
    """An approximately orthogonal matrix with `g`'s singular vectors (g: a 2-d NDArray)."""
    a, b, c = NS_COEFFICIENTS
    x = g / (mx.nd.norm(g) + eps)  # top singular value <= 1
    tall = g.shape[0] > g.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = mx.nd.dot(x, x, transpose_b=True)
        poly = b * gram + c * mx.nd.dot(gram, gram)
        x = a * x + mx.nd.dot(poly, x)
    return x.T if tall else x


@mx.optimizer.register
class Muon(mx.optimizer.NAG):
    """Muon for convolution filters, NAG for every other parameter (see the module's docstring).

    momentum: the NAG parameters' momentum; muon_momentum: the filters' (Nesterov) momentum;
    muon_scale: the filters' LR / the others' LR; ns_steps: Newton-Schulz iterations."""

    def __init__(self, muon_momentum: float = 0.6, muon_scale: float = 1.0, ns_steps: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.muon_momentum = float(muon_momentum)
        self.muon_scale = float(muon_scale)
        self.ns_steps = int(ns_steps)

    @staticmethod
    def is_filter(weight) -> bool:
        return len(weight.shape) == 4

    def create_state(self, index, weight):
        if self.is_filter(weight):
            return mx.nd.zeros(weight.shape, weight.context, dtype=weight.dtype)
        return super().create_state(index, weight)

    def create_state_multi_precision(self, index, weight):
        if self.is_filter(weight) and np.dtype(weight.dtype) != np.float32:
            raise ValueError("muon updates float32 filters only")
        return super().create_state_multi_precision(index, weight)

    def update(self, index, weight, grad, state):
        if not self.is_filter(weight):
            return super().update(index, weight, grad, state)
        self._update_count(index)
        lr = self._get_lr(index) * self.muon_scale
        g = grad * self.rescale_grad
        if self.clip_gradient:
            g = mx.nd.clip(g, -self.clip_gradient, self.clip_gradient)
        state[:] = self.muon_momentum * state + g
        g = g + self.muon_momentum * state  # Nesterov
        out_channels = weight.shape[0]
        step = newton_schulz(g.reshape((out_channels, -1)), self.ns_steps).reshape(weight.shape)
        weight[:] = weight * (math.sqrt(out_channels) / (mx.nd.norm(weight) + 1e-12)) - lr * step
        return None

    def update_multi_precision(self, index, weight, grad, state):
        if not self.is_filter(weight):
            return super().update_multi_precision(index, weight, grad, state)
        return self.update(index, weight, grad, state)
