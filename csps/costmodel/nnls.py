"""Non-negative least squares, Lawson and Hanson's active-set method (Solving Least Squares
Problems, 1974, ch. 23), in numpy: the fitter of the cost model's coefficients. No torch.
"""

from __future__ import annotations

import numpy as np


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None,
         tol: float = 1e-10) -> np.ndarray:
    """argmin_x ||a x - b||_2 subject to x >= 0. a [m, n], b [m] -> x [n].

    Columns are scaled to unit norm internally (coefficients of very different magnitudes,
    seconds per byte next to seconds per token). Raises ValueError on bad shapes or
    non-finite input."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or b.shape != (a.shape[0],):
        raise ValueError(f"want a [m, n] and b [m]; got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("nnls input must be finite")
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0
    a = a / norms  # [m, n], unit columns
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)  # P: variables free to be positive
    for _ in range(max_iter or 3 * n + 30):
        gradient = a.T @ (b - a @ x)  # w: the descent direction of each variable
        if passive.all() or gradient[~passive].max(initial=-np.inf) <= tol:
            break
        best = np.where(passive, -np.inf, gradient).argmax()
        passive[best] = True
        while True:  # inner loop: keep the unconstrained solution on P feasible
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if not passive.any() or z[passive].min() > 0:
                x = z
                break
            shrinking = passive & (z <= 0)
            step = x[shrinking] - z[shrinking]  # > 0 unless x and z are both 0 there
            alpha = np.min(np.divide(x[shrinking], step, out=np.zeros_like(step),
                                     where=step > 0))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x / norms
