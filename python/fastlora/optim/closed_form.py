"""LoRA-Pro's closed form (docs/lora_pro.md), batched over layers of the same rank.

Notation (PEFT's): ``A`` is r x n, ``B`` is m x r, ``s`` the layer's scale, ``gA = s B^T G`` and
``gB = s G A^T`` the LoRA gradients of a loss whose gradient in the merged weight ``W + s B A`` is
``G``. A LoRA step along ``(hA, hB)`` moves the merged weight along the *equivalent gradient*
``s B hA + s hB A``; the closed form picks

    hA = (1/s^2) (B^T B)^+ gA + X A
    hB = (1/s^2) (I - P_B) gB (A A^T)^+ - B X,          P_B = B (B^T B)^+ B^T

whose equivalent gradient ``P_B G + G P_A - P_B G P_A`` is the closest to ``G`` for every ``X``,
and ``X`` (r x r) keeps ``(hA, hB)`` closest to ``(gA, gB)``: the Sylvester equation
``(B^T B) X + X (A A^T) = -(1/s^2) (B^T B)^+ gA A^T``. ``G`` itself is never needed, nor is any
m x m or n x n matrix: everything is O((m + n) r^2).

The Gram matrices are decomposed with ``torch.linalg.eigh`` (one batched call for all layers of a
rank), in float32 for any parameter dtype but float64. Their pseudo-inverses invert eigenvalues
above ``r * machine epsilon`` times the largest one as ``1 / (lambda + ridge)`` and drop the rest,
so ``B = 0`` (the usual initialisation) gives ``(B^T B)^+ = 0`` and finite results.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from .._numerics import accumulation_dtype

__all__ = [
    "DEFAULT_RIDGE",
    "X_MODES",
    "GramProjector",
    "check_settings",
    "equivalent_gradient",
    "lora_pro_gradients",
    "solve_sylvester",
]

DEFAULT_RIDGE = 1e-8
_NEWTON_STEPS = 8  # the trust region's damping: converged to float64 by 6 on random problems (B from 1 to 1e-8)
X_MODES = ("sylvester", "symmetry", "zero")


def check_settings(x_mode: str, ridge: float) -> None:
    """ValueError unless ``x_mode`` is one of :data:`X_MODES` and ``ridge`` a number >= 0."""
    if x_mode not in X_MODES:
        raise ValueError(f"unknown x_mode {x_mode!r}; choose one of {X_MODES}")
    if not isinstance(ridge, numbers.Real) or not ridge >= 0.0:
        raise ValueError(f"ridge must be a number >= 0, got {ridge!r}")


def _cutoff(values: Tensor, dims: tuple[int, ...], n: int) -> Tensor:
    """Values at or below this are numerically zero (relative to the largest, as pinv's rtol)."""
    return values.amax(dim=dims, keepdim=True) * (n * torch.finfo(values.dtype).eps)


def _kept(lam: Tensor) -> Tensor:
    """The Gram eigenvalues (last dimension) that are inverted: those above the relative cutoff."""
    lam = lam.clamp_min(0)
    return lam > _cutoff(lam, (-1,), lam.shape[-1])


def _inverse_eigenvalues(lam: Tensor, ridge: float, delta: Tensor | float = 0.0) -> Tensor:
    """``1 / (lam + ridge + delta)`` on the kept eigenvalues, 0 on the others."""
    zero = torch.zeros((), dtype=lam.dtype, device=lam.device)
    return torch.where(_kept(lam), 1.0 / (lam.clamp_min(0) + ridge + delta), zero)


def _sylvester_from_eigh(lam: Tensor, u: Tensor, mu: Tensor, v: Tensor, c: Tensor) -> Tensor:
    """X with P X + X Q = C, given P = u diag(lam) u^T and Q = v diag(mu) v^T (both PSD); the
    components whose ``lam_i + mu_j`` is numerically zero are set to 0."""
    denom = lam.clamp_min(0).unsqueeze(-1) + mu.clamp_min(0).unsqueeze(-2)
    keep = denom > _cutoff(denom, (-2, -1), denom.shape[-1])
    rotated = u.mT @ c @ v
    y = torch.where(keep, rotated / torch.where(keep, denom, torch.ones_like(denom)), torch.zeros_like(rotated))
    return u @ y @ v.mT


def solve_sylvester(p: Tensor, q: Tensor, c: Tensor) -> Tensor:
    """Solves ``P X + X Q = C`` for symmetric positive (semi)definite ``P`` (r x r) and ``Q`` with
    two real ``eigh`` (batched over leading dimensions). Where ``P`` and ``Q`` share a null
    direction the equation has no unique solution; that component of ``X`` is set to 0."""
    lam, u = torch.linalg.eigh(p)
    mu, v = torch.linalg.eigh(q)
    return _sylvester_from_eigh(lam, u, mu, v, c)


class GramProjector:
    """The closed form for groups of layers of one rank r, with one batched ``eigh`` for all.

    Group ``i`` holds ``K_i`` layers of the same shape, stacked: ``As[i]`` (K_i, r, n_i),
    ``Bs[i]`` (K_i, m_i, r) and ``scales[i]`` (K_i,), all in the compute dtype on one device.
    Methods take and return per-group lists of stacked gradients.
    """

    def __init__(self, As: Sequence[Tensor], Bs: Sequence[Tensor], scales: Sequence[Tensor], ridge: float) -> None:
        self.As, self.Bs = list(As), list(Bs)
        self.sizes = [a.shape[0] for a in self.As]
        self.ridge = ridge
        k = sum(self.sizes)
        grams = torch.cat([b.mT @ b for b in self.Bs] + [a @ a.mT for a in self.As])
        lam, vec = torch.linalg.eigh(grams)
        self._lam_b, self._u_b, self._lam_a, self._u_a = lam[:k], vec[:k], lam[k:], vec[k:]
        pinv = (vec * _inverse_eigenvalues(lam, ridge).unsqueeze(-2)) @ vec.mT
        self.b_pinv = list(pinv[:k].split(self.sizes))
        self.a_pinv = list(pinv[k:].split(self.sizes))
        self.a_gram = list(grams[k:].split(self.sizes))
        self.inv_s2 = [(1.0 / s.square()).reshape(-1, 1, 1) for s in scales]

    def base(self, i: int, grad_A: Tensor, grad_B: Tensor, b_pinv: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The X-free part of the closed form for group ``i``:
        ``((1/s^2) (B^T B)^+ gA, (1/s^2) (I - P_B) gB (A A^T)^+)`` (``b_pinv``: a damped
        ``(B^T B)^+`` to use instead, see :meth:`trust_damping`)."""
        b = self.Bs[i]
        bp = self.b_pinv[i] if b_pinv is None else b_pinv
        h_a = self.inv_s2[i] * (bp @ grad_A)
        h_b = self.inv_s2[i] * ((grad_B - b @ (bp @ (b.mT @ grad_B))) @ self.a_pinv[i])
        return h_a, h_b

    def trust_damping(self, grads_A: Sequence[Tensor], radii: Sequence[Tensor]) -> list[Tensor]:
        """Per layer the smallest ``delta >= 0`` with ``‖(1/s^2) (B^T B + delta I)^+ gA‖_F <= radius``
        (radii: one per layer, a (K_i,) tensor per group; ``inf`` for no bound): the damping of
        ``B``'s Gram matrix that keeps the X-free part of ``A``'s step inside the trust region.

        On the eigendecomposition ``‖h_A(delta)‖^2 = sum_j w_j / (lam_j + delta)^2``; Newton's method
        on ``1/‖h_A(delta)‖ - 1/radius`` (increasing and concave in ``delta``, so the iterates rise
        monotonically to the root from 0, Moré and Sorensen's trust-region iteration) in float64."""
        keep = _kept(self._lam_b)
        # w_j per layer (one product per group: the groups' in-features differ), then one
        # Newton iteration for all layers of this rank
        w = torch.cat([
            ((u.mT @ g).square().sum(-1) * s2.reshape(-1, 1).square()).double()
            for u, g, s2 in zip(self._u_b.split(self.sizes), grads_A, self.inv_s2)
        ]).where(keep, 0.0)
        lam = torch.where(keep, self._lam_b.clamp_min(0).double() + self.ridge, 1.0)  # w = 0 off the kept ones
        inv_radius = 1.0 / torch.cat(list(radii)).double().to(w.device)
        delta = torch.zeros_like(inv_radius)
        for _ in range(_NEWTON_STEPS):
            d = lam + delta.unsqueeze(-1)
            q = (w / d.square()).sum(-1)  # ‖h_A‖^2
            phi = q.rsqrt() - inv_radius
            slope = q.pow(-1.5) * (w / d.pow(3)).sum(-1)  # d(q^-1/2)/d(delta)
            delta = torch.where(phi < 0, delta - phi / slope, delta)
        return list(delta.to(self._lam_b.dtype).split(self.sizes))

    def _damped_b(self, damping: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        """``(B^T B + delta I)^+`` per group and the damped eigenvalues of ``B^T B``."""
        deltas = torch.cat(list(damping)).unsqueeze(-1)
        pinv = (self._u_b * _inverse_eigenvalues(self._lam_b, self.ridge, deltas).unsqueeze(-2)) @ self._u_b.mT
        return list(pinv.split(self.sizes)), torch.where(_kept(self._lam_b), self._lam_b + deltas, self._lam_b)

    def x(
        self, grads_A: Sequence[Tensor], grads_B: Sequence[Tensor], x_mode: str,
        b_pinv: Sequence[Tensor] | None = None, lam_b: Tensor | None = None,
    ) -> list[Tensor]:
        """X per group: the Sylvester solution (one batched solve), the "symmetry" choice
        ``-(1/2)(1/s^2)(B^T B)^+ B^T gB A A^T`` or zero (``b_pinv``, ``lam_b``: damped
        ``(B^T B)^+`` and eigenvalues of ``B^T B`` to use instead)."""
        b_pinv = self.b_pinv if b_pinv is None else b_pinv
        if x_mode == "sylvester":
            c = torch.cat(
                [-s2 * (bp @ (ga @ a.mT)) for s2, bp, ga, a in zip(self.inv_s2, b_pinv, grads_A, self.As)]
            )
            lam_b = self._lam_b if lam_b is None else lam_b
            return list(_sylvester_from_eigh(lam_b, self._u_b, self._lam_a, self._u_a, c).split(self.sizes))
        if x_mode == "symmetry":
            return [
                -0.5 * s2 * (bp @ (b.mT @ gb) @ g)
                for s2, bp, b, gb, g in zip(self.inv_s2, b_pinv, self.Bs, grads_B, self.a_gram)
            ]
        if x_mode == "zero":
            return [torch.zeros_like(bp) for bp in b_pinv]
        raise ValueError(f"unknown x_mode {x_mode!r}; choose one of {X_MODES}")

    def adjust(
        self, grads_A: Sequence[Tensor], grads_B: Sequence[Tensor], x_mode: str,
        radii: Sequence[Tensor] | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """The adjusted gradients ``(hA, hB)`` per group (the full closed form). With ``radii``
        (one per layer, see :meth:`trust_damping`) ``B``'s Gram matrix is damped so that the
        X-free part of ``hA`` has at most that norm; with ``x_mode="sylvester"`` or ``"zero"``
        ``‖hA‖_F`` is then at most twice the radius."""
        b_pinv, lam_b = None, None
        if radii is not None:
            b_pinv, lam_b = self._damped_b(self.trust_damping(grads_A, radii))
        xs = self.x(grads_A, grads_B, x_mode, b_pinv, lam_b)
        out = []
        for i, (ga, gb, x) in enumerate(zip(grads_A, grads_B, xs)):
            h_a, h_b = self.base(i, ga, gb, None if b_pinv is None else b_pinv[i])
            out.append((h_a + x @ self.As[i], h_b - self.Bs[i] @ x))
        return out


def _check_pair(lora_A: Tensor, lora_B: Tensor, grad_A: Tensor, grad_B: Tensor) -> None:
    if lora_A.dim() not in (2, 3) or lora_B.dim() != lora_A.dim():
        raise ValueError(
            f"lora_A and lora_B must both be 2-D (one layer) or 3-D (a batch), got {tuple(lora_A.shape)} "
            f"and {tuple(lora_B.shape)}"
        )
    if lora_B.shape[-1] != lora_A.shape[-2] or lora_B.shape[:-2] != lora_A.shape[:-2]:
        raise ValueError(
            f"lora_B {tuple(lora_B.shape)} does not fit lora_A {tuple(lora_A.shape)} (B is out x r, A is r x in)"
        )
    for name, g, p in (("grad_A", grad_A, lora_A), ("grad_B", grad_B, lora_B)):
        if g.shape != p.shape:
            raise ValueError(f"{name} has shape {tuple(g.shape)}, expected {tuple(p.shape)}")


def lora_pro_gradients(
    lora_A: Tensor,
    lora_B: Tensor,
    grad_A: Tensor,
    grad_B: Tensor,
    scale: float | Tensor,
    x_mode: str = "sylvester",
    ridge: float = DEFAULT_RIDGE,
) -> tuple[Tensor, Tensor]:
    """LoRA-Pro's adjusted gradients ``(hA, hB)`` for one layer (2-D ``lora_A`` r x in, ``lora_B``
    out x r) or a batch of same-shaped layers (3-D, with ``scale`` a number or a tensor of one per
    layer), in float32 (float64 for float64 inputs). See the module docstring for the formulas."""
    _check_pair(lora_A, lora_B, grad_A, grad_B)
    if x_mode not in X_MODES:
        raise ValueError(f"unknown x_mode {x_mode!r}; choose one of {X_MODES}")
    single = lora_A.dim() == 2
    dtype = accumulation_dtype(lora_A.dtype)
    a, b, ga, gb = (t.to(dtype).unsqueeze(0) if single else t.to(dtype) for t in (lora_A, lora_B, grad_A, grad_B))
    s = torch.as_tensor(scale, dtype=dtype, device=a.device).reshape(-1).expand(a.shape[0])
    h_a, h_b = GramProjector([a], [b], [s], ridge).adjust([ga], [gb], x_mode)[0]
    return (h_a[0], h_b[0]) if single else (h_a, h_b)


def equivalent_gradient(lora_A: Tensor, lora_B: Tensor, grad_A: Tensor, grad_B: Tensor, scale: float) -> Tensor:
    """``s (B hA + hB A)``: the direction a LoRA step along ``(hA, hB)`` moves the merged weight
    to first order (for the plain LoRA gradients it is ``s^2 (B B^T G + G A^T A)``)."""
    _check_pair(lora_A, lora_B, grad_A, grad_B)
    dtype = accumulation_dtype(lora_A.dtype)
    return scale * (lora_B.to(dtype) @ grad_A.to(dtype) + grad_B.to(dtype) @ lora_A.to(dtype))
