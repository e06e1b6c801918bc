"""The fused path: the layer's two big products with the rank-r terms inside them (Triton).

    forward   y  = [x | s·xa] · [W | B]^T + b          one accumulator, the rank-r block last
    backward  dx = drop'(dxa · A) + dy · W              one accumulator: the rank-r tile, masked
                                                        (mask regenerated in registers), then dy W

so ``y`` and ``dx`` are written once and never read back. The rest is as on the composed path
(:mod:`fastlora.composed`, whose forward and backward it shares): ``xa = drop(x) A^T`` in forward,
``dxa = s dy B``, ``dB = s dy^T xa`` and ``dA = dxa^T drop(x)`` in backward (on CUDA
:mod:`fastlora.skinny`'s single-pass kernels), saving only ``x``, ``xa`` and the seed.

The kernels are written once in Triton's language: compiled for CUDA tensors (autotuned per
architecture and bucket of T, results cached by Triton; never benchmarked under CUDA-graph
capture), run by Triton's interpreter for CPU tensors, which is how CI checks them against the
float64 oracle without a GPU (float32/float16; the interpreter gets bfloat16 wrong). The dropout hash is ``csrc/kernels/common/dropout_rng.h``'s, bit for bit.
"""

import inspect
from typing import Any, Optional

import torch
from torch import Tensor

from .composed import lora_backward, lora_forward
from .skinny import dropout_args, dot_precision, needs_index_64

__all__ = ["available", "lora_linear", "forward", "grad_x"]

try:
    import triton

    from .fused_kernels import compiled, custom_ops, fastlora_forward_kernel, fastlora_grad_x_kernel, interpreted
except ImportError:  # the fused path needs Triton; everything else works without it
    triton = None

# Rank-r blocks are padded to at least this (tl.dot needs 16 along every dimension) and looped
# over in blocks of at most _MAX_BLOCK_R: the rank tile stays in registers for any rank (ptxas
# reports spills in the forward at 64 on sm_90a, none at 32: benchmarks/kernel_spills.py).
_MIN_DOT, _MAX_BLOCK_R = 16, 32


def available() -> bool:
    """Whether Triton (and torch.library.triton_op) are present."""
    return triton is not None and hasattr(torch.library, "triton_op")


# Tiles the autotuner tries on a GPU, per architecture: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
# None has run on a GPU yet: they follow the hardware limits and ptxas's register report
# (benchmarks/kernel_spills.py compiles them without a GPU), not timings. Each kernel keeps one
# fp32 accumulator, so a 128 x 256 tile at 8 warps holds 128 accumulator registers per thread.
_CONFIGS = {
    # sm90 (H100, 228 KiB shared memory per SM): 64-deep K slices. 128x256 (Triton's usual best
    # for large bf16 GEMMs there) spills a little, as Triton's own masked matmul does, and is
    # kept for the autotuner to judge; the others compile without spills; 32-row tiles for
    # short batches.
    9: ((128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 256, 64, 8, 4), (64, 128, 64, 4, 4),
        (32, 128, 64, 4, 4)),
    # sm80 (A100, 164 KiB): 32-deep K slices so 3-4 stages of the big tiles fit (128x256x32:
    # 3 x 24 KiB), as cuBLAS's sm80 kernels do; smaller tiles for short batches.
    8: ((128, 256, 32, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 8, 3), (64, 128, 32, 4, 4),
        (32, 128, 32, 4, 4)),
}
# Shared memory one SM offers a block (KiB), by compute capability; smaller for unlisted ones.
_SMEM_KIB = {(9, 0): 227, (8, 0): 163}
_DEFAULT_SMEM_KIB = 99
_GROUP_M = 8  # row blocks per band of the grouped tile order
_INTERPRETED_TILE = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


def _m_bucket(m: int) -> int:
    """The autotuner's key for M: the next power of two, so batch lengths do not each re-tune."""
    return triton.next_power_of_2(max(m, 1))


def _configs(capability: tuple[int, int]) -> list:
    rows = _CONFIGS.get(capability[0], _CONFIGS[8])
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=_GROUP_M), num_warps=w, num_stages=s)
            for m, n, k, w, s in rows]


def _smem_kib(config: Any, element_size: int) -> float:
    kw = config.kwargs
    return config.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * element_size / 1024


def _prune(configs: list, m_bucket: int, element_size: int, capability: tuple[int, int]) -> list:
    """The configs worth timing: row tiles no taller than the bucket of M (beyond the smallest
    one), stages that fit the SM's shared memory. At least one, the smallest, stays."""
    limit = _SMEM_KIB.get(capability, _DEFAULT_SMEM_KIB)
    smallest = min(configs, key=lambda c: (_smem_kib(c, element_size), c.kwargs["BLOCK_M"]))
    shortest = min(c.kwargs["BLOCK_M"] for c in configs)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(m_bucket, shortest)
            and _smem_kib(c, element_size) <= limit]
    return kept or [smallest]


_KERNELS: dict = {}
_TUNED: dict = {}  # launch key -> the config the autotuner chose, for launches under graph capture


def _kernel(name: str, interpret: bool, capability: tuple[int, int] = (0, 0)) -> Any:
    """The kernel as Triton's interpreter runs it (CPU tensors), or compiled and autotuned per
    (bucket of M, N, K, R, dtype) for a GPU of this compute capability (CUDA tensors)."""
    key = (name, interpret, capability)
    if key not in _KERNELS:
        fn = {"forward": fastlora_forward_kernel, "grad_x": fastlora_grad_x_kernel}[name]
        if interpret:
            _KERNELS[key] = interpreted(fn)
        else:
            def early_prune(configs, named_args, **kwargs):
                x = named_args.get("x_ptr", named_args.get("dy_ptr"))
                return _prune(configs, named_args["M_BUCKET"], x.element_size(), capability)

            # The tuning result per shape persists on disk where this Triton can (cache_results).
            persist = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
            _KERNELS[key] = triton.autotune(_configs(capability), key=["M_BUCKET", "N", "K", "R"],
                                            prune_configs_by={"early_config_prune": early_prune},
                                            **persist)(compiled(fn))
    return _KERNELS[key]


def _capture_config(key: tuple, m_bucket: int, element_size: int, capability: tuple[int, int]) -> Optional[Any]:
    """The config to launch without the autotuner, or None to let it choose. Under CUDA-graph
    capture the autotuner must not benchmark (its launches would be captured, its timing syncs
    fail): the config it chose earlier for this key, else the smallest that fits."""
    if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return None
    if key in _TUNED:
        return _TUNED[key]
    pruned = _prune(_configs(capability), m_bucket, element_size, capability)
    return min(pruned, key=lambda c: _smem_kib(c, element_size))


def _launch(name: str, out: Tensor, k: int, rank: int, *args: Any, **flags: Any) -> None:
    """Runs kernel ``name`` writing ``out`` (M x N) over a K-deep product and a rank-``rank`` term."""
    m, n = out.shape
    block_r = min(_MAX_BLOCK_R, max(_MIN_DOT, triton.next_power_of_2(rank)))
    bucket = _m_bucket(m)
    if out.device.type == "cpu":
        tile = _INTERPRETED_TILE
        grid = (triton.cdiv(m, tile["BLOCK_M"]) * triton.cdiv(n, tile["BLOCK_N"]),)
        _kernel(name, True)[grid](*args, **flags, M_BUCKET=bucket, BLOCK_R=block_r, **tile)
        return
    from torch.library import wrap_triton

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    capability = torch.cuda.get_device_capability(out.device)
    tuner = _kernel(name, False, capability)
    key = (name, capability, bucket, n, k, rank, out.dtype, tuple(sorted(flags.items())))
    fixed = _capture_config(key, bucket, out.element_size(), capability)
    if fixed is not None:
        wrap_triton(tuner.fn)[grid](*args, **flags, M_BUCKET=bucket, BLOCK_R=block_r, **fixed.all_kwargs())
        return
    wrap_triton(tuner)[grid](*args, **flags, M_BUCKET=bucket, BLOCK_R=block_r)
    if not torch.compiler.is_compiling() and getattr(tuner, "best_config", None) is not None:
        _TUNED[key] = tuner.best_config  # (traced launches do not run: best_config is another key's)


def _forward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], xa: Tensor, lora_B: Tensor,
                  scale: float) -> Tensor:
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    m, k = x.shape
    n, r = weight.shape[0], xa.shape[1]
    _launch("forward", y, k, r, x, weight, bias if bias is not None else weight, xa, lora_B, y, m, n, k, r,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), 0 if bias is None else bias.stride(0),
            xa.stride(0), xa.stride(1), lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), scale,
            HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype),
            INDEX_64=needs_index_64(x, weight, xa, lora_B, y, *(() if bias is None else (bias,))))
    return y


def _grad_x_impl(dy: Tensor, weight: Tensor, dxa: Tensor, lora_A: Tensor, seed: Optional[Tensor],
                 dropout_p: float) -> Tensor:
    dx = torch.empty(dy.shape[0], weight.shape[1], dtype=dy.dtype, device=dy.device)
    m, k = dy.shape
    n, r = weight.shape[1], dxa.shape[1]
    drop = dropout_p > 0.0
    _launch("grad_x", dx, k, r, dy, weight, dxa, lora_A, seed if drop else dy, dx, m, n, k, r,
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), dxa.stride(0), dxa.stride(1),
            lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
            *dropout_args(dropout_p),
            DROPOUT=drop, PAIRED=n % 2 == 0, PRECISION=dot_precision(dy.dtype), INDEX_64=needs_index_64(dy, weight, dxa, lora_A, dx))
    return dx


if available():
    _ops = {
        "forward": custom_ops("fused_forward", _forward_impl,
                              lambda x, weight, *args: x.new_empty(x.shape[0], weight.shape[0])),
        "grad_x": custom_ops("fused_grad_x", _grad_x_impl,
                             lambda dy, weight, *args: dy.new_empty(dy.shape[0], weight.shape[1])),
    }


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], xa: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """``x W^T + b + (s·xa) B^T`` in one GEMM (2-D x, x's dtype)."""
    return _ops["forward"]["cuda" if x.is_cuda else "cpu"](x, weight, bias, xa, lora_B, scale)


def grad_x(dy: Tensor, weight: Tensor, dxa: Tensor, lora_A: Tensor, seed: Optional[Tensor], dropout_p: float) -> Tensor:
    """``dy W + mask/(1-p) ⊙ (dxa A)`` in one kernel, the mask regenerated from ``seed``."""
    return _ops["grad_x"]["cuda" if dy.is_cuda else "cpu"](dy, weight, dxa, lora_A, seed, dropout_p)


def _fused_grad_x(dy: Tensor, weight: Tensor, dxa: Tensor, lora_A: Tensor, seed: Optional[Tensor], p: float,
                  mask: Optional[Tensor]) -> Tensor:
    return grad_x(dy, weight, dxa, lora_A, seed, p)  # the kernel regenerates the mask itself


class _FusedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                scale: float, dropout_p: float, seed: Optional[Tensor]) -> Tensor:
        return lora_forward(ctx, x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, product=forward)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple:
        return lora_backward(ctx, dy, grad_x=_fused_grad_x)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scale: float,
                dropout_p: float, seed: Optional[Tensor]) -> Tensor:
    """``x W^T + b + scale * (drop(x) A^T) B^T`` for a 2-D x through the fused kernels
    (arguments checked by the caller); differentiable in every tensor argument but the seed."""
    return _FusedLoRA.apply(x, weight, bias, lora_A, lora_B, float(scale), float(dropout_p), seed)
