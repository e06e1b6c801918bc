"""Gradient collection sharded over 2 and 4 CPU processes (gloo) and LoRA-GA / GoRA from its
result (docs/distributed.md): each rank keeps out·in / world of every exact accumulator, the
sketches are summed whole, and every rank ends with the same adapters, equal to one process's
initialisation from all batches within bounds derived from float32 rounding."""

from __future__ import annotations

import math

import fastlora
import pytest
import torch
from fastlora._distributed import chunk_rows
from fastlora.gradients import GradientStats
from fsdp_helpers import TinyDecoder, needs_fsdp2, shard_model, spawn, token_magnitudes

# the same gloo requirement (TinyDecoder lives with the FSDP example); multi-process, so slow
pytestmark = [needs_fsdp2, pytest.mark.slow]

TARGETS = ["up", "down", "head"]  # 16 x 8, 8 x 16 and 5 x 8: rows 2, 2, 1, 0 of head on 4 ranks
BATCHES = 4  # rank r of w takes batches r, r + w, ...
SKETCH_RANK = 4
U = torch.finfo(torch.float32).eps / 2


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def _model():
    torch.manual_seed(0)
    return TinyDecoder(d=8, h=16, depth=2, out=5)


def _batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(6, 8, generator=g), torch.randn(6, 5, generator=g)) for _ in range(BATCHES)]


def _loss(model, b):
    x, y = b
    return (model(x) - y).pow(2).mean()


def _collect(batches, **kwargs) -> GradientStats:
    return fastlora.collect_gradients(_model(), batches, targets=TARGETS, loss_fn=_loss, progress=False, **kwargs)


def _initialised(init: str, stats: GradientStats) -> dict[str, torch.Tensor]:
    """A fresh model initialised by ``init`` from ``stats``: its adapters and base weights."""
    model = _model()
    # r = 2: q = min(4r, out, in) is min(out, in) for every layer (see the LoRA-GA check).
    fastlora.inject(model, target_modules=TARGETS, r=2, lora_alpha=6, generator=torch.Generator().manual_seed(0))
    if init.startswith("lora_ga"):
        fastlora.init.lora_ga(model, stats, {"svd": init.removeprefix("lora_ga_")})
    else:
        fastlora.init.gora(model, stats, {"r_ref": 2})
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(("lora_A", "lora_B", "weight"))}


INITS = {"exact": ("lora_ga_randomized", "lora_ga_exact", "gora"), "sketch": ("lora_ga_sketch", "gora")}


def _worker(rank, world, out_dir):
    mine = _batches()[rank::world]
    stats = {"exact": _collect(mine, shard=True),
             "sketch": _collect(mine, shard=True, mode="sketch", sketch_rank=SKETCH_RANK, passes=2),
             # one layer per pass (a budget of one 16 x 8 float32 accumulator): each reduced after its pass
             "passes": _collect(mine, shard=True, offload="passes", memory_budget=16 * 8 * 4)}
    # The same collection on an FSDP2-sharded model (FSDP gathers each block's weights in forward).
    sharded_model = shard_model(_model())
    on_fsdp = fastlora.collect_gradients(sharded_model, mine, targets=TARGETS, loss_fn=_loss, progress=False,
                                         shard=True)
    out = {"stats": stats, "on_fsdp": {name: (g.rows, g.mean) for name, g in on_fsdp.items()}}
    for mode, inits in INITS.items():
        for init in inits:
            out[mode, init] = _initialised(init, stats[mode])
    # A NaN in rank 0's rows: every rank refuses (none waits in a collective for the others).
    mean = stats["exact"]["blocks.0.up"].mean
    kept = mean[0, 0].item()
    if rank == 0:
        mean[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        _initialised("lora_ga_randomized", stats["exact"])
    mean[0, 0] = kept
    # An already sharded model is refused before anything changes (LoRA-GA rewrites W).
    model = _model()
    fastlora.inject(model, target_modules=TARGETS, r=2)
    shard_model(model)
    with pytest.raises(ValueError, match="fully_shard"):
        fastlora.init.lora_ga(model, stats["exact"])
    return out


def _singular_vector_bound(sigma: torch.Tensor, delta: float, used: int) -> torch.Tensor:
    """How far (2-norm) each singular vector of a matrix with singular values ``sigma`` (computed)
    may move when the matrix moves by ``delta`` in Frobenius norm: the singular vectors are
    eigenvectors of the symmetric dilation [[0, G], [G^T, 0]] (eigenvalues ±σ and, G not being
    square, 0), and Davis-Kahan in the form of Yu, Wang and Samworth (2015) moves an eigenvector
    by at most 2^{3/2} delta / gap, so u and v each by at most 4 delta / gap. The gaps are those of
    the exact spectrum, within delta of the computed one; only the first ``used`` are needed."""
    others = (sigma[:, None] - sigma[None, :]).abs() + torch.diag(torch.full_like(sigma, math.inf))
    gap = (torch.minimum(others.min(dim=1).values, sigma) - 2 * delta)[:used]
    assert bool((gap > 0).all()), "the test's spectrum has no usable gaps"
    return 4 * delta / gap


def _check_lora_ga(got: dict, want: dict, single: GradientStats, mags: dict, n: int, tokens: int, world: int):
    for name, g in single.items():
        mean = g.mean.double()
        r = got[f"{name}.lora_A"].shape[0]
        # Both sides decompose Ḡ + (accumulation rounding) + (backward error of the algorithm: its
        # 2 niter + 3 products and factorizations with Ḡ, each within gamma_{out·in} ‖Ḡ‖_F).
        acc = float((2 * gamma(tokens + world) * mags[name] / n + 2 * U * g.mean.abs()).double().norm())
        delta = acc + 2 * (2 * 4 + 3) * gamma(g.out_features * g.in_features) * float(mean.norm())
        sigma = torch.linalg.svdvals(mean)
        move = _singular_vector_bound(sigma, delta, 2 * r)
        c = g.out_features**0.25 / 16**0.5  # LoRA-GA's "stable" scale
        a, b = got[f"{name}.lora_A"], got[f"{name}.lora_B"]
        a0, b0 = want[f"{name}.lora_A"], want[f"{name}.lora_B"]
        for i in range(r):  # A = c V[:, :r]^T, B = c U[:, r:2r]
            for diff, bound in (((a[i] - a0[i]).norm(), c * move[i] + 2 * U * a0[i].norm()),
                                ((b[:, i] - b0[:, i]).norm(), c * move[r + i] + 2 * U * b0[:, i].norm())):
                assert float(diff) <= float(bound), f"{name}: vector {i} moved {float(diff):.3g} > {float(bound):.3g}"
        # W - s B A from the stored factors (float32), s = 2: each side within gamma_r of exact.
        da, db = (a - a0).norm(), (b - b0).norm()
        w_bound = 2 * (db * a0.norm() + b0.norm() * da + da * db) + 2 * (
            U * want[f"{name}.base_layer.weight"].norm() + 2 * gamma(r) * (b0.abs() @ a0.abs()).norm())
        w_diff = (got[f"{name}.base_layer.weight"] - want[f"{name}.base_layer.weight"]).norm()
        assert float(w_diff) <= float(w_bound), f"{name}: base weight moved {float(w_diff):.3g} > {float(w_bound):.3g}"


def _check_gora(got: dict, want: dict, grads: dict[str, torch.Tensor], errors: dict[str, torch.Tensor]):
    """B = -ξ Ḡ A^T (A A^T)^{-1}: a change E of Ḡ moves it by ξ ‖E‖_F ‖A‖_2 ‖(A A^T)^{-1}‖_2; each
    side's product Ḡ A^T is within gamma_in |Ḡ||A^T| and its solve within gamma_{3r} κ of exact."""
    for name, grad in grads.items():
        a, b = got[f"{name}.lora_A"], got[f"{name}.lora_B"]
        r = a.shape[0]
        assert want[f"{name}.lora_A"].shape == a.shape, f"{name}: a different rank"
        assert torch.equal(a, want[f"{name}.lora_A"]), f"{name}: A is drawn from the same seed"
        eig = torch.linalg.eigvalsh(a.double() @ a.double().T)
        xi = 0.05 * math.sqrt(a.shape[1]) / 6
        product = (grad.abs() @ a.abs().T).norm()
        bound = (xi / eig[0] * (errors[name].norm() * eig[-1].sqrt() + 2 * gamma(a.shape[1]) * product)
                 + 2 * gamma(3 * r) * (eig[-1] / eig[0]) * want[f"{name}.lora_B"].norm())
        diff = (b - want[f"{name}.lora_B"]).norm()
        assert float(diff) <= float(bound), f"{name}: B moved {float(diff):.3g} > {float(bound):.3g}"


@pytest.mark.filterwarnings("ignore:GoRA. importances from sketches are estimates")  # sketch mode is the point
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_collection_and_init_equal_one_process(tmp_path, world):
    ranks = spawn(_worker, tmp_path, world=world)
    torch.set_num_threads(1)
    batches = _batches()
    single = _collect(batches)
    tokens = sum(x.shape[0] for x, _ in batches)
    mags = token_magnitudes(_model(), batches, list(single), _loss)

    # Exact mode: each rank keeps torch.chunk's block of rows, out·in/world bytes per layer.
    whole = ranks[0]["stats"]["exact"].summary["accumulator_bytes_whole"]
    assert whole == sum(4 * g.out_features * g.in_features for g in single.values())
    for rank, r in enumerate(ranks):
        stats = r["stats"]["exact"]
        assert stats.summary["sharded"] and stats.summary["world_size"] == world
        for name, g in stats.items():
            assert g.rows == chunk_rows(g.out_features, world, rank) and g.mean.shape[0] == g.rows[1] - g.rows[0]
        assert stats.summary["accumulator_bytes"] == sum(4 * g.mean.numel() for g in stats.values())
        for name, g in stats.items():  # the same arithmetic on the FSDP2-sharded model: the same bits
            assert r["on_fsdp"][name][0] == g.rows and torch.equal(r["on_fsdp"][name][1], g.mean), name
        # Layer by layer in separate passes: the same bits, and at most one whole accumulator next
        # to the rows kept so far (the last layer's whole one after all others' rows, or up's).
        passes = r["stats"]["passes"]
        assert passes.summary["passes"] == len(stats) and passes.summary["accumulator_bytes_whole"] == whole
        kept = [4 * g.mean.numel() for g in stats.values()]
        wholes = [4 * g.out_features * g.in_features for g in stats.values()]
        assert passes.summary["accumulator_bytes_peak"] == max(sum(kept[:i]) + w for i, w in enumerate(wholes)) < whole
        assert stats.summary["accumulator_bytes_peak"] == whole  # one pass: all whole at once
        for name, g in stats.items():
            assert passes[name].rows == g.rows and torch.equal(passes[name].mean, g.mean), name
    assert sum(r["stats"]["exact"].summary["accumulator_bytes"] for r in ranks) == whole
    up = [r["stats"]["exact"]["blocks.0.up"].mean.numel() * 4 for r in ranks]  # 16 rows split evenly
    assert up == [4 * 16 * 8 // world] * world
    # ... and the rows, put together, are one process's Ḡ to the rounding of adding the same token
    # terms (and the ranks' sums) in another order.
    for name, g in single.items():
        mean = torch.cat([r["stats"]["exact"][name].mean for r in ranks])
        bound = 2 * gamma(tokens + world) * mags[name] / BATCHES + 2 * U * g.mean.abs()
        assert bool(((mean - g.mean).abs() <= bound).all()), name

    # Sketch mode: whole sketches on every rank, the same bits (also the second pass's basis, which
    # must come from all ranks' batches), equal to one process's within the rounding bound.
    sketched = _collect(batches, mode="sketch", sketch_rank=SKETCH_RANK)
    for name, g in sketched.items():
        sk = ranks[0]["stats"]["sketch"][name].sketch
        for r in ranks[1:]:
            other = r["stats"]["sketch"][name].sketch
            for field in ("range", "corange", "basis", "projection"):
                assert torch.equal(getattr(sk, field), getattr(other, field)), f"{name}: {field} differs"
        assert torch.equal(sk.omega, g.sketch.omega) and torch.equal(sk.psi, g.sketch.psi)
        # Y = sum_t dy_t^T (x_t Ω): the token terms added in another order, and x_t Ω rounded
        # (within gamma_in |x_t| |Ω|); likewise Z = sum_t (dy_t Ψ^T)^T x_t.
        terms, g_in, g_out = gamma(tokens + world), gamma(g.in_features), gamma(g.out_features)
        y_bound = 2 * (terms + g_in) * (1 + g_in) * (mags[name] @ sk.omega.abs()) / BATCHES
        z_bound = 2 * (terms + g_out) * (1 + g_out) * (sk.psi.abs() @ mags[name]) / BATCHES
        assert bool(((sk.range - g.sketch.range).abs() <= y_bound + 2 * U * g.sketch.range.abs()).all()), name
        assert bool(((sk.corange - g.sketch.corange).abs() <= z_bound + 2 * U * g.sketch.corange.abs()).all()), name

    # Every rank the same adapters and base weights, bit for bit.
    for key in [k for k in ranks[0] if k not in ("stats", "on_fsdp")]:
        for r in ranks[1:]:
            for name, value in ranks[0][key].items():
                assert torch.equal(value, r[key][name]), f"{key}: ranks differ on {name}"

    # Against one process: exact-mode LoRA-GA (randomized SVD with q = min(out, in): a full basis,
    # so the same singular vectors as the exact SVD) and GoRA from all batches.
    for init in INITS["exact"][:2]:
        _check_lora_ga(ranks[0]["exact", init], _initialised(init, single), single, mags, BATCHES, tokens, world)
    acc_errors = {n: 2 * gamma(tokens + world) * mags[n] / BATCHES + 2 * U * g.mean.abs() for n, g in single.items()}
    _check_gora(ranks[0]["exact", "gora"], _initialised("gora", single),
                {n: g.mean for n, g in single.items()}, acc_errors)
    # Sketch mode: one process initialising from the ranks' (whole) sketch: LoRA-GA computes the
    # same bits; GoRA differs only in forming its rows of Ḡ ≈ U S V^T block by block.
    sketch_stats = ranks[0]["stats"]["sketch"]
    replicated = GradientStats(dict(sketch_stats.items()), "sketch", {"world_size": 1})
    for name, value in _initialised("lora_ga_sketch", replicated).items():
        assert torch.equal(ranks[0]["sketch", "lora_ga_sketch"][name], value), name
    grads, errors = {}, {}
    for name, g in replicated.items():
        u, s, vh = g.sketch.low_rank(SKETCH_RANK)
        grads[name] = (u * s) @ vh
        errors[name] = 2 * gamma(SKETCH_RANK) * (u.abs() * s) @ vh.abs()
    _check_gora(ranks[0]["sketch", "gora"], _initialised("gora", replicated), grads, errors)
