"""How the DiT executes (vosr/model/execution.py): activation checkpointing gives the un-checkpointed step's
gradients and recomputes exactly the chosen blocks; torch.compile captures the forward with no graph break and
matches eager (training: forward and backward; inference: tiled upscales at several tile sizes, without a compile
per tile size). Two inductor compiles in this module (they take seconds each on a CPU)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from jobkit.config import config_from_dict
from vosr.flow import training_loss
from vosr.model import build_dit, compile_dit, model_dims, set_activation_checkpointing
from vosr.seeding import generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _model(student: bool = False, depth: int = 4):
    """Tiny DiT whose final layer is not zero (at init it is, docs/method.md s4, which would hide the blocks)."""
    cfg = config_from_dict({}, [f"model.depth={depth}"])
    torch.manual_seed(0)
    model = build_dit(cfg, student=student)
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0, 0.05)
        model.final_layer.adaLN_modulation[1].weight.normal_(0, 0.05)
    return cfg, model


def _batch(cfg, b: int = 2, side: int = 16):
    d = model_dims(cfg)
    g = torch.Generator().manual_seed(1)
    hq = torch.randn(b, d["latent_channels"], side, side, generator=g)
    return hq, torch.randn(hq.shape, generator=g), torch.randn(b, d["sem_tokens"], d["sem_dim"], generator=g)


def _grads(model, cfg, batch):
    model.zero_grad(set_to_none=True)
    loss, _ = training_loss(model, *batch, cfg.flow, generator(7))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("every", [1, 2, 3])
def test_checkpointing_gives_the_same_gradients(every):
    cfg, model = _model()
    batch = _batch(cfg)
    loss0, ref = _grads(model, cfg, batch)
    set_activation_checkpointing(model, every)
    calls = [0] * len(model.blocks)
    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    loss1, got = _grads(model, cfg, batch)
    assert torch.equal(loss0, loss1)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-7, msg=name)
    # blocks 0, k, 2k, ... are entered twice (forward, then the recomputation in backward, which stops as soon
    # as it has rebuilt what backward needs, so only pre-hooks see it); the others once
    assert calls == [2 if i % every == 0 else 1 for i in range(len(model.blocks))]


def test_checkpointing_is_off_without_gradients_and_checks_its_input():
    cfg, model = _model()
    set_activation_checkpointing(model, 1)
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(*_batch(cfg)[:1], torch.rand(2), *_batch(cfg)[1:])
    assert calls == [1]
    with pytest.raises(ValueError, match=">= 0"):
        set_activation_checkpointing(model, -1)
    with pytest.raises(TypeError, match="VOSRDiT"):
        set_activation_checkpointing(torch.nn.Linear(2, 2), 1)


def test_training_loop_applies_the_train_keys():
    from training.loop import set_execution

    cfg, model = _model()
    tc = config_from_dict({}, ["train.activation_checkpointing=2"]).train
    set_execution(model, tc)
    assert model.checkpoint_every == 2
    assert not any(getattr(m, "_compiled_call_impl", None) for m in model.modules())


@pytest.mark.parametrize("student", [False, True])
def test_forward_has_no_graph_break(student):
    """torch._dynamo.explain over the whole DiT forward (teacher; student with r and precomputed semantic
    keys/values; with activation checkpointing on): one graph, no break."""
    cfg, model = _model(student=student)
    hq, lq, sem = _batch(cfg)
    t = torch.rand(2)
    extra = {"r": t * 0.5} if student else {}
    ctx = model.prepare_semantic(sem) if student else sem
    for every in (0, 2):
        set_activation_checkpointing(model, every)
        torch._dynamo.reset()
        ex = torch._dynamo.explain(model)(hq, t, lq, ctx, **extra)
        assert ex.graph_break_count == 0, ex.break_reasons
        assert ex.graph_count == 1


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_compiled_training_step_equals_eager():
    """Inductor, as train.compile runs it: every block shares one graph (plus the final layer's), each compiled
    with its backward and no graph break; loss and gradients equal eager within 1e-5."""
    from torch._dynamo.utils import counters

    cfg, eager = _model(depth=6)
    compiled = compile_dit(copy.deepcopy(eager))
    batch = _batch(cfg)
    torch._dynamo.reset()
    before, aot_before, breaks = _graphs(), counters["aot_autograd"]["ok"], sum(counters["graph_break"].values())
    loss_c, grads_c = _grads(compiled, cfg, batch)
    loss_e, grads_e = _grads(eager, cfg, batch)
    assert _graphs() - before == 2          # one for all 6 blocks, one for the final layer
    assert counters["aot_autograd"]["ok"] - aot_before == 2    # each with its backward graph, no break
    assert sum(counters["graph_break"].values()) == breaks
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=1e-5)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=0, atol=1e-5, msg=name)
    assert list(compiled.state_dict()) == list(eager.state_dict())   # checkpoints keep their parameter names
    _, grads_again = _grads(compiled, cfg, batch)    # a second step reuses the graphs
    assert _graphs() - before == 2
    torch.testing.assert_close(grads_again["blocks.0.mlp.w12.weight"], grads_c["blocks.0.mlp.w12.weight"])


def test_compiled_tiled_inference_one_graph_across_tile_sizes(photos):
    """inference.compile: tiled upscales at three tile sizes equal the eager upscaler's, and the graphs compiled
    for the first tile size serve the others (dynamic shapes: no compile per tile size). The sizes avoid a tile
    whose token count equals the semantic token count (64 here): dynamo would specialise on that equality and
    compile once more for the next size (docs/gpu-memory.md)."""
    from PIL import Image

    from vosr.upscaler import Upscaler

    cfg, model = _model(student=True)
    photo = Image.open(photos[0]).convert("RGB").resize((40, 32))
    eager = Upscaler((copy.deepcopy(model), cfg), cfg, device="cpu")
    compiled = Upscaler((model, cfg), config_from_dict({}, ["inference.compile=true"]), device="cpu")
    torch._dynamo.reset()
    before = _graphs()
    counts = []
    for tile in (48, 80, 96):     # 6x6, 10x10 and 12x12 tokens per tile
        a = np.asarray(compiled.upscale(photo, tile_size=tile, tile_batch=1, seed=3), dtype=np.int16)
        b = np.asarray(eager.upscale(photo, tile_size=tile, tile_batch=1, seed=3), dtype=np.int16)
        assert np.abs(a - b).max() <= 1      # 8-bit rounding of outputs within 1e-5 of each other
        counts.append(_graphs() - before)
    assert counts[0] >= 2 and counts[1] == counts[0] and counts[2] == counts[0], counts   # blocks, final layer
