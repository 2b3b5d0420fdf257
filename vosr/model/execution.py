"""How the DiT executes, without changing what it computes: activation checkpointing and torch.compile.

Activation checkpointing (`train.activation_checkpointing`): every k-th block (blocks 0, k, 2k, ...) keeps only its
inputs in the forward pass and recomputes its activations in the backward pass (torch.utils.checkpoint, the
non-reentrant form, which works under DDP and FSDP2 and inside torch.compile). k = 1 checkpoints every block, 0 none.
Gradients are the same numbers as without it; it trades about one extra forward of the checkpointed blocks for their
activation memory (training/memory_plan.py prints both sides).

torch.compile (`train.compile`, `inference.compile`): each DiT block and the final layer are compiled in place
(`nn.Module.compile`, so parameter names and checkpoints are unchanged), as the reference compiles its block
forward, modulation, SwiGLU and final layer (docs/method.md s4). All blocks share one compiled graph (their code is
the same; parameters are graph inputs). Compiling per block keeps the compiled regions small (fast to compile) and
composes with FSDP2's per-block sharding, which wraps the same modules. Inference compiles with dynamic shapes, so
tiles of any size (and whole images of any size) reuse one graph instead of compiling one per token count.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def set_activation_checkpointing(model: nn.Module, every: int) -> nn.Module:
    """Checkpoint every `every`-th block of a VOSRDiT (0 = none, 1 = all). Returns the model."""
    every = int(every)
    if every < 0:
        raise ValueError(f"activation checkpointing interval must be >= 0 (0 = none), got {every}")
    if not hasattr(model, "checkpoint_every"):
        raise TypeError(f"{type(model).__name__} has no checkpoint_every; activation checkpointing needs a VOSRDiT")
    model.checkpoint_every = every
    return model


def checkpointed_blocks(depth: int, every: int) -> int:
    """How many of `depth` blocks recompute their activations with interval `every`."""
    return 0 if every <= 0 else len(range(0, depth, every))


def compile_dit(model: nn.Module, *, dynamic: bool | None = None, backend: Any = "inductor",
                mode: str | None = None) -> nn.Module:
    """torch.compile each block and the final layer in place (fullgraph: a graph break raises instead of silently
    splitting the block). `dynamic=True` for inference (one graph for every token count); None lets dynamo
    specialise on the first shape (training has one). Returns the model; calling it twice is harmless."""
    targets = list(getattr(model, "blocks", []))
    final = getattr(model, "final_layer", None)
    if final is not None:
        targets.append(final)
    if not targets:
        raise TypeError(f"{type(model).__name__} has no blocks to compile; compile_dit needs a VOSRDiT")
    for module in targets:
        module.compile(fullgraph=True, dynamic=dynamic, backend=backend, mode=mode)
    return model
