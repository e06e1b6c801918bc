"""EVA, Explained Variance Adaptation (Paischer et al., arXiv 2410.07170): ``lora_A`` starts as the
top right-singular vectors of each target layer's inputs over calibration batches, ``lora_B = 0``
(the output is unchanged), and the ranks are redistributed across layers by explained variance.

Faithful to PEFT 0.21.2's ``init_lora_weights="eva"`` + ``initialize_lora_eva_weights``:

- per layer an incremental PCA of its inputs (centred, float32, low-rank SVD ``q = 2k``,
  ``niter = 4``, seed 42, sign fixed by each component's largest entry), ``k = round(r·rho)``;
  in each layer's forward hook, one batch at a time: memory holds one layer's inputs of one batch
  and the ``k`` components per layer, never all activations;
- layers whose inputs are equal on the first batch share one PCA (as PEFT's hash check);
- a layer stops once the cosine similarity of each of its needed components with the previous
  batch's is ``>= tau``; the batches are cycled until every layer has stopped;
- ranks: the global top ``sum(r)`` explained variance ratios, at most ``k`` per layer; a layer of
  rank 0 loses its adapter; ``adjust_scaling_factors`` scales alpha by ``new_r / r``;
- ``whiten`` divides each component by the square root of its singular value.

Language-model batches (mappings with ``input_ids``) use the rows that ``attention_mask`` keeps
and, with ``use_label_mask``, whose ``labels`` differ from ``label_mask_value``; other batches use
every row (PEFT with ``prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None``).
Applying the result (new ranks, removed layers) is :func:`fastlora.initialize_lora_eva_weights`.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._batches import call_model, to_device
from ..config import EvaConfig, eva_config_from
from ..layer import LoRALinear, lora_layers
from ..progress import Progress

__all__ = ["EvaConfig", "eva_config_from", "get_eva_state_dict"]

logger = logging.getLogger("fastlora")

_SEED, _NITER = 42, 4  # PEFT's SVDHook: IncrementalPCA(lowrank=True, lowrank_seed=42), niter 4


class _IncrementalPCA:
    """PEFT's ``IncrementalPCA(n_components=k, lowrank=True, lowrank_seed=42)`` ``partial_fit``:
    running mean/variance in float64, the previous components scaled by their singular values
    stacked over the centred batch and the mean correction, then a low-rank SVD."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.count = 0
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self.components: Tensor | None = None  # k x features
        self.singular_values: Tensor | None = None
        self.explained_variance_ratio: Tensor | None = None

    def partial_fit(self, x: Tensor) -> None:
        n = x.shape[0]
        total = self.count + n
        batch_sum = x.sum(0, dtype=torch.float64)
        batch_mean = batch_sum / n
        centred = x - batch_mean
        batch_ss = centred.square().sum(0, dtype=torch.float64) - centred.sum(0, dtype=torch.float64).square() / n
        if self.mean is None:
            mean, var = batch_sum / total, batch_ss / total
            stacked = (x - mean).to(x.dtype)  # PEFT centres in place: float32 on the first batch
        else:
            old_sum = self.mean * self.count
            ratio = self.count / n
            var = (self.var * self.count + batch_ss + ratio / total * (old_sum / ratio - batch_sum).square()) / total
            mean = (old_sum + batch_sum) / total
            correction = (self.count / total * n) ** 0.5 * (self.mean - x.mean(0))
            # float64 from here on: the float64 correction promotes the stack (as PEFT's vstack does)
            stacked = torch.vstack((self.singular_values[:, None] * self.components, x - x.mean(0), correction))
        with torch.random.fork_rng(devices=[stacked.device] if stacked.device.type == "cuda" else []):
            torch.manual_seed(_SEED)
            _, s, v = torch.svd_lowrank(stacked, q=2 * self.k, niter=_NITER)
        vt = v.mT
        rows = torch.arange(vt.shape[0], device=vt.device)
        vt = vt * torch.sign(vt[rows, vt.abs().argmax(1)])[:, None]  # sklearn's svd_flip on V
        self.count, self.mean, self.var = total, mean, var
        self.components = vt[: self.k]
        self.singular_values = s[: self.k]
        self.explained_variance_ratio = (s.square() / torch.sum(var * total))[: self.k]


def _rows(layer_input: Tensor, mask: Tensor | None) -> Tensor:
    """The 2-d rows of a layer's input the PCA sees (the masked tokens, or every row)."""
    if mask is not None:
        return layer_input[mask]
    return layer_input.reshape(-1, layer_input.shape[-1])


def _gathered(rows: Tensor) -> Tensor:
    """Every rank's rows, in rank order (PEFT's ``gather_distributed_inputs``): the PCA then sees
    the whole global batch on every rank, so all ranks reach the same components and ranks."""
    world = dist.get_world_size()
    size = torch.tensor([rows.shape[0]], device=rows.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(n) for n in sizes]
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _mask(batch: Any, config: EvaConfig) -> Tensor | None:
    """PEFT's language-modelling mask (attention mask and label mask) or None (every row)."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        return None
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    if config.use_label_mask and "labels" in batch:
        mask = mask & (batch["labels"] != config.label_mask_value)
    return mask


def _digest(x: Tensor) -> str:
    return hashlib.sha1(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def _redistribute(pcas: dict[str, _IncrementalPCA], shared: dict[str, str], budget: int,
                  k: dict[str, int]) -> dict[str, int]:
    """PEFT's rank distribution: the global top ``budget`` explained variance ratios (at most
    ``k[name]`` per layer); a layer sharing another's PCA never outranks it."""
    order = {**{n: n for n in pcas}, **shared}
    keys, values = zip(*[(name, v) for name, owner in order.items()
                         for v in pcas[owner].explained_variance_ratio[: k[name]]])
    idx = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in idx[:budget].tolist())
    ranks = {name: counts.get(name, 0) for name in order}
    for name, owner in shared.items():
        if ranks[owner] < ranks[name]:
            ranks[owner], ranks[name] = ranks[name], ranks[owner]
    return ranks


class _EvaRun:
    """One EVA run's state, shared with the layers' forward hooks: the current batch's row mask,
    the layers still fitted, the first batch's input digests, the PCAs and their convergence."""

    def __init__(self, k: dict[str, int], config: EvaConfig, gather: bool) -> None:
        self.k, self.config, self.gather = k, config, gather
        self.mask: Tensor | None = None
        self.active: set[str] = set()
        self.digests: dict[str, str] = {}
        self.pcas: dict[str, _IncrementalPCA] = {}
        self.converged: dict[str, Tensor] = {}
        self.shared: dict[str, str] = {}  # layer -> the first layer with equal inputs (whose PCA it shares)

    def update(self, name: str, x: Tensor) -> None:
        """One PCA step on this batch's rows (inside the hook: one layer's rows in memory at a time)."""
        if not self.pcas:  # the first batch: only which layers see equal inputs
            self.digests[name] = _digest(x)
            return
        k = self.k[name]
        if x.shape[0] < k:
            logger.warning("fastlora: eva: skipping a batch for %s: %d rows < %d components", name, x.shape[0], k)
            return
        pca = self.pcas[name]
        previous = pca.components
        pca.partial_fit(x.to(torch.float32))
        if previous is not None:
            self.converged[name] = (nn.functional.cosine_similarity(pca.components, previous) >= self.config.tau).cpu()

    def hook_for(self, name: str):
        def hook(module, args, output):
            if name in self.active:
                rows = _rows(args[0], self.mask)
                self.update(name, _gathered(rows) if self.gather else rows)
        return hook

    def first_batch(self, model: nn.Module, batches: Iterable, layers: dict[str, LoRALinear],
                    device: torch.device) -> None:
        """Runs the first batch to find the layers with equal inputs: they share one PCA (with the
        larger ``k``); then makes one PCA per distinct input."""
        first = next(iter(batches), None)
        if first is None:
            raise ValueError("batches is empty; give the calibration batches (a DataLoader or a list)")
        first = to_device(first, device)
        self.mask = _mask(first, self.config)
        self.active.update(layers)
        call_model(model, first)
        owners: dict[str, str] = {}
        for name in layers:
            owner = owners.setdefault(self.digests[name], name)
            if owner != name:
                self.shared[name] = owner
        k = self.k
        for name, owner in self.shared.items():
            k[owner] = max(k[owner], k[name])
        for name, owner in self.shared.items():
            k[name] = k[owner]
        self.pcas.update({name: _IncrementalPCA(k[name]) for name in layers if name not in self.shared})
        self.converged.update({name: torch.zeros(k[name], dtype=torch.bool) for name in self.pcas})

    def until_converged(self, model: nn.Module, batches: Iterable, budget: int, device: torch.device,
                        show_progress_bar: bool) -> dict[str, int]:
        """Cycles the batches (as PEFT) until every layer's needed components have converged,
        redistributing the ranks after each batch; returns the ranks."""
        ranks = dict(self.k)
        rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        progress = Progress("eva", None, bar=show_progress_bar and rank0)
        done = False
        while not done:
            for batch in batches:
                batch = to_device(batch, device)
                self.mask = _mask(batch, self.config)
                self.active.clear()
                self.active.update(n for n in self.pcas if not bool(self.converged[n][: ranks[n]].all()))
                if not self.active:
                    done = True
                    break
                call_model(model, batch)
                progress.update()
                if all(p.components is not None for p in self.pcas.values()):
                    ranks = _redistribute(self.pcas, self.shared, budget, self.k)
        progress.close(f"{len(self.k)} layers, ranks {sorted(set(ranks.values()))}")
        return ranks

    def lora_a(self, ranks: dict[str, int]) -> dict[str, Tensor]:
        """Each layer's ``lora_A``: the top ``ranks[name]`` components of its PCA (whitened if asked)."""
        state = {}
        for name in self.k:
            pca = self.pcas[self.shared.get(name, name)]
            u = pca.components[: ranks[name]].clone()
            if self.config.whiten:
                u = u / pca.singular_values[: ranks[name]].sqrt()[:, None]
            state[name] = u
        return state


def _checked_layers(model: nn.Module, batches: Iterable,
                    config: EvaConfig) -> tuple[dict[str, LoRALinear], dict[str, int]]:
    """The model's LoRA layers and the components each needs (``round(r·rho)``); clear errors for a
    model without LoRA layers, an iterator of batches, or too many components for a layer."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call fastlora.inject(model, ...) first")
    if iter(batches) is batches:
        raise TypeError("EVA cycles the batches until its components converge: give a re-iterable (a list or a "
                        "DataLoader), not an iterator or generator")
    k = {name: round(layer.r * config.rho) for name, layer in layers.items()}
    too_wide = [f"{n} (k={k[n]}, in={layers[n].in_features})" for n in layers if k[n] > layers[n].in_features]
    if too_wide:
        raise ValueError(f"EVA needs round(r*rho) <= in_features per layer; too many components for {too_wide[:4]}: "
                         "lower r or EvaConfig.rho")
    return layers, k


@torch.no_grad()
def get_eva_state_dict(model: nn.Module, batches: Iterable, config: Any = None, show_progress_bar: bool = True,
                       gather_distributed_inputs: bool = True) -> dict[str, Tensor]:
    """EVA's ``lora_A`` for every LoRA layer of ``model`` (``new_r x in``, float32; ``0 x in`` for
    a layer that gets no rank), from forward passes over ``batches`` (re-iterable, not empty;
    cycled until every layer's components converge). The adapters must not change the outputs
    (``B = 0``, as right after :func:`fastlora.inject`); the model is left as it was.

    Under ``torch.distributed`` with ``gather_distributed_inputs`` (PEFT's default) every rank's
    layer inputs are gathered (each rank must get different batches, the same number of them);
    without it each rank computes from its own batches."""
    config = eva_config_from(config)
    layers, k = _checked_layers(model, batches, config)
    budget = sum(layer.r for layer in layers.values())
    device = next(iter(layers.values())).lora_A.device
    gather = gather_distributed_inputs and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    run = _EvaRun(k, config, gather)
    training = model.training
    model.eval()
    handles = [layer.register_forward_hook(run.hook_for(name)) for name, layer in layers.items()]
    try:
        run.first_batch(model, batches, layers, device)
        ranks = run.until_converged(model, batches, budget, device, show_progress_bar)
    finally:
        for handle in handles:
            handle.remove()
        run.active.clear()
        model.train(training)
    return run.lora_a(ranks)
