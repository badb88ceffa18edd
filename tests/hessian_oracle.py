"""An explicit dense Hessian of the mean loss of a tiny network, independent of
minsharp_ref's derivative code (only the IR's float64 forward is used, as the function).

With the activation pattern fixed (ReLU signs, max-pool arg-maxes), the logits z of a
network of the importer's layers are affine in any single parameter tensor and bilinear in
any two coordinates θ_i, θ_j (every path from input to logits crosses a layer at most
once). So the four-point difference

    ∂²z/∂θ_i∂θ_j = [z(+h_i,+h_j) − z(+h_i,−h_j) − z(−h_i,+h_j) + z(−h_i,−h_j)] / (4 h_i h_j)

is exact up to rounding (zero when i = j or both are in one tensor), as is the central
difference J = ∂z/∂θ. Then, with the loss derivatives in closed form,

    H = (1/N) Σ_n [ J_nᵀ A_n J_n + Σ_k (∂L/∂z_k) ∂²z_{n,k}/∂θ∂θ ]

(G, the Gauss-Newton matrix, is the first term). A kink inside a step is detected by
repeating every difference with half the step (a bilinear function gives the same
numbers); ``KinkError`` then asks for another draw.
"""

from __future__ import annotations

import numpy as np

from minsharp_ref.engine import tensor_columns


class KinkError(AssertionError):
    pass


def loss_derivatives(z: np.ndarray, y, loss: str):
    """(∂L/∂z (N, K), ∂²L/∂z² (N, K, K)) of one sample's loss, in closed form."""
    n, k = z.shape
    if loss == "cross-entropy":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        g = p - np.eye(k)[y]
        a = np.einsum("nk,kj->nkj", p, np.eye(k)) - p[:, :, None] * p[:, None, :]
        return g, a
    if loss == "binary":
        p = 1.0 / (1.0 + np.exp(-z[:, 0]))
        return (p - y)[:, None], (p * (1 - p))[:, None, None]
    if loss == "mse":
        return 2.0 / k * (z - np.asarray(y, float).reshape(n, k)), np.broadcast_to(2.0 / k * np.eye(k), (n, k, k))
    raise ValueError(loss)


def flat_parameters(network):
    cols = tensor_columns(network)
    layers = network.param_layers
    arrays = [np.asarray(getattr(layers[d], w), dtype=np.float64) for d, w, _ in cols]
    return [n for _, _, n in cols], arrays


def _logits_fn(network, x):
    names, arrays = flat_parameters(network)
    shapes = [a.shape for a in arrays]
    sizes = np.cumsum([0] + [a.size for a in arrays])
    theta0 = np.concatenate([a.reshape(-1) for a in arrays])

    def f(theta):
        params = {n: theta[sizes[j]:sizes[j + 1]].reshape(shapes[j]) for j, n in enumerate(names)}
        return network.with_parameters(params).forward(x)
    return f, theta0, sizes


def _second_derivatives(f, theta0, steps, tensor):
    """J (N, K, P) and M (N, K, P, P) by central / four-point differences with ``steps``."""
    p = theta0.size
    z0 = f(theta0)
    jac = np.empty(z0.shape + (p,))
    for i in range(p):
        up, dn = theta0.copy(), theta0.copy()
        up[i] += steps[i]
        dn[i] -= steps[i]
        jac[..., i] = (f(up) - f(dn)) / (up[i] - dn[i])
    m = np.zeros(z0.shape + (p, p))
    for i in range(p):
        for j in range(i + 1, p):
            if tensor[i] == tensor[j]:  # affine in one tensor: zero
                continue
            vals = []
            for si, sj in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
                t = theta0.copy()
                t[i] += si * steps[i]
                t[j] += sj * steps[j]
                vals.append(f(t))
            m[..., i, j] = m[..., j, i] = (vals[0] - vals[1] - vals[2] + vals[3]) / (4 * steps[i] * steps[j])
    return z0, jac, m


def dense_hessian(network, x, y, loss: str, rel_step: float = 2.0 ** -9):
    """(H, G) of the mean loss over (x, y): P×P in the order of ``tensor_columns``."""
    f, theta0, sizes = _logits_fn(network, x)
    steps = np.empty(theta0.size)
    tensor = np.repeat(np.arange(len(sizes) - 1), np.diff(sizes))
    for j in range(len(sizes) - 1):
        block = theta0[sizes[j]:sizes[j + 1]]
        scale = float(np.max(np.abs(block))) or 1.0
        steps[sizes[j]:sizes[j + 1]] = 2.0 ** np.round(np.log2(rel_step * scale))
    z, jac, m = _second_derivatives(f, theta0, steps, tensor)
    _, jac2, m2 = _second_derivatives(f, theta0, steps / 2, tensor)
    for a, b in ((jac, jac2), (m, m2)):
        scale = np.max(np.abs(a)) + 1e-300
        if np.max(np.abs(a - b)) > 1e-8 * scale:
            raise KinkError(f"a kink within a step: {np.max(np.abs(a - b)) / scale:.2g}")
    g, a = loss_derivatives(z, y, loss)
    n = len(x)
    gn = np.einsum("nki,nkl,nlj->ij", jac, a, jac) / n
    return gn + np.einsum("nk,nkij->ij", g, m) / n, gn
