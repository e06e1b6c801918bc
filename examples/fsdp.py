"""FSDP2 training with fastlora adapters (docs/distributed.md): a small decoder-style model,
adapters on its projections, optionally initialised by LoRA-GA or GoRA from gradients collected on
every rank (sharded by rows), ``fully_shard`` on every block and on the root, AdamW or LoRA-Pro,
optional gradient checkpointing and bfloat16 compute, and a sharded checkpoint at the end.

    torchrun --nproc_per_node 2 examples/fsdp.py --optimizer lora-pro --steps 20   # CPU, gloo
    torchrun --nproc_per_node 2 examples/fsdp.py --init lora-ga --optimizer lora-pro
    torchrun --nproc_per_node 2 examples/fsdp.py --nf4 --optimizer lora-pro        # QLoRA bases
    torchrun --nproc_per_node 8 examples/fsdp.py --device cuda --bf16              # GPUs, nccl
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        examples/fsdp.py --device cuda --bf16                                      # on each node

It needs fastlora installed (or ``python/`` on ``PYTHONPATH``); the tests import its model
(``TinyDecoder``, ``quantize_blocks``, ``shard_model``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

import fastlora

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import MixedPrecisionPolicy, fully_shard  # noqa: E402  (FSDP2 wherever this torch has it)

__all__ = ["Block", "TinyDecoder", "quantize_blocks", "shard_model", "parse_args", "main"]


class Block(nn.Module):
    """A residual MLP block: the FSDP unit, as a decoder layer is in a real model."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class TinyDecoder(nn.Module):
    """Blocks and a head; ``checkpointing`` recomputes each block in backward."""

    def __init__(self, d: int, h: int, depth: int, out: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(depth))
        self.head = nn.Linear(d, out)
        self.checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
        return self.head(x)


def quantize_blocks(model: TinyDecoder, storage: torch.dtype = torch.bfloat16, device: str = "cpu") -> TinyDecoder:
    """Replaces every block's projections by bitsandbytes NF4 layers of the same weights, the
    packed 4-bit weights stored as ``storage`` (accelerate's FSDP QLoRA recipe: a float storage
    dtype lets ``fully_shard`` shard them; with a ``MixedPrecisionPolicy`` whose ``param_dtype``
    differs from ``storage`` FSDP would cast the packed bytes, so use ``storage=param_dtype``).
    The base model is frozen, as ``from_pretrained(..., quantization_config=...)`` leaves it."""
    import bitsandbytes as bnb

    for block in model.blocks:
        for name in ("up", "down"):
            dense = getattr(block, name)
            quantized = bnb.nn.Linear4bit(dense.in_features, dense.out_features, compute_dtype=torch.float32,
                                          quant_type="nf4", quant_storage=storage)
            with torch.no_grad():
                quantized.weight.data.copy_(dense.weight)
                quantized.bias.copy_(dense.bias)
            setattr(block, name, quantized.to(device))  # bitsandbytes quantizes on .to(device)
    return model.requires_grad_(False)


def shard_model(model: TinyDecoder, **fully_shard_kwargs) -> TinyDecoder:
    """``fully_shard`` on every block (its adapters are sharded with it), then on the root."""
    for block in model.blocks:
        fully_shard(block, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=("adamw", "lora-pro"), default="adamw")
    parser.add_argument("--init", choices=("lora", "lora-ga", "gora"), default="lora",
                        help="gradient-driven initialisation before sharding (each rank its calibration batches)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 gradient reduction")
    parser.add_argument("--nf4", action="store_true",
                        help="QLoRA: NF4 bases (bitsandbytes), packed weights stored as bfloat16 and sharded")
    parser.add_argument("--checkpointing", action="store_true", help="recompute each block in backward")
    parser.add_argument("--save", default=None, help="write a torch.distributed.checkpoint folder here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()

    torch.manual_seed(0)  # the same initial model on every rank
    model = TinyDecoder(d=64, h=256, depth=4, out=8).to(device)
    if args.nf4:
        quantize_blocks(model, torch.bfloat16, str(device)).head.requires_grad_(True)
    fastlora.inject(model, target_modules=["up", "down"], r=8, lora_alpha=16)
    target = nn.Linear(64, 8).to(device)  # a fixed teacher to regress onto

    def data(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * rank + step)  # each rank its own data
        return torch.randn(32, 64, generator=g).to(device)

    def loss_fn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return (model(x).float() - target(x).detach()).pow(2).mean()

    if args.init != "lora":  # before sharding: these inits rewrite adapters (and LoRA-GA the weights)
        calibration = [data(-1 - i) for i in range(4)]
        stats = fastlora.collect_gradients(model, calibration, targets=["up", "down"], loss_fn=loss_fn,
                                           shard=True, progress=False)
        if args.init == "lora-ga":
            fastlora.init.lora_ga(model, stats)
        else:
            fastlora.init.gora(model, stats, {"r_ref": 8})
        if rank == 0:
            s = stats.summary
            print(f"{args.init}: accumulators kept per rank {s['accumulator_bytes'] / 2**20:.2f} MiB of "
                  f"{s['accumulator_bytes_whole'] / 2**20:.2f} MiB", flush=True)
    model.checkpointing = args.checkpointing
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else None
    shard_model(model, **({"mp_policy": policy} if policy else {}))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = fastlora.optim.LoRAPro(model, lr=1e-2) if args.optimizer == "lora-pro" else torch.optim.AdamW(trainable, 1e-2)

    for step in range(args.steps):
        loss = loss_fn(model, data(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step}: rank-0 loss {loss.item():.4f}", flush=True)
    if args.save:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=args.save)
        if rank == 0:
            print(f"saved a sharded checkpoint to {args.save}", flush=True)
    dist.barrier()  # no rank tears gloo down while another still talks to it (it can abort)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
