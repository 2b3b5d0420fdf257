"""The per-GPU memory plan (training/memory_plan.py): its live-bytes counter is exact, the fake full-size step
agrees with the CPU allocator's own peak on a real step, checkpointing, DDP and FSDP change it the way they change
real memory, the largest micro-batch it names fits while one more does not, and the shipped 512 px recipe fits
an 80 GiB GPU."""

from __future__ import annotations

import pytest
import torch

from jobkit.config import config_from_dict, load_config
from training.memory_plan import (
    GIB,
    LiveTensorBytes,
    StepSetup,
    configured_setup,
    format_plan,
    gpu_memory_section,
    grad_accum_for,
    main,
    measure_cpu_step,
    plan_training,
    simulate_step,
    usable_peak_gib,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_counter_follows_live_storages_and_keeps_the_peak():
    with LiveTensorBytes() as t:
        a = torch.empty(1000, dtype=torch.float32)          # 4000 B
        b = torch.empty(500, dtype=torch.float64)           # 4000 B
        view = a[:10]                                        # a view: no new storage
        del b
        c = torch.empty(250, dtype=torch.bfloat16)          # 500 B
        assert t.current == 4500 and t.peak == 8000
        t.retag(a, "parameters")
        assert t.category_bytes() == {"parameters": 4000, "other": 500}
        del a, view, c
    assert t.current == 0 and t.peak == 8000


def test_fake_step_agrees_with_the_cpu_allocator():
    """The same step at a small size: planned with fake tensors, and run for real with the CPU allocator's
    allocation events counted by torch.profiler (benchmarks/bench_memory_plan.py does three sizes)."""
    cfg = config_from_dict({}, ["data.resolution=64"])
    setup = StepSetup("pretrain", micro_batch=4, precision="fp32")
    planned = simulate_step(cfg, setup).peak_bytes
    measured = measure_cpu_step(cfg, setup)
    assert abs(planned / measured - 1) < 0.15, (planned, measured)


def test_checkpointing_ddp_and_fsdp_move_the_peak_as_they_should():
    cfg = config_from_dict({}, ["data.resolution=64"])
    base = simulate_step(cfg, StepSetup("pretrain", 8, precision="fp32"))
    every = simulate_step(cfg, StepSetup("pretrain", 8, precision="fp32", checkpointing=1))
    assert every.by_category.get("activations", 0) < base.by_category["activations"] / 2
    assert every.peak_bytes < base.peak_bytes
    params = base.by_category["parameters"]
    ddp = simulate_step(cfg, StepSetup("pretrain", 8, precision="fp32", strategy="ddp", world=2))
    assert ddp.peak_bytes == base.peak_bytes + params      # DDP's flat fp32 gradient buckets
    fsdp = simulate_step(cfg, StepSetup("pretrain", 8, precision="fp32", strategy="fsdp", world=4))
    assert fsdp.by_category["parameters"] < params / 3     # each rank holds about a quarter
    assert fsdp.by_category["optimizer state"] < base.by_category["optimizer state"] / 3


def test_largest_micro_batch_fits_and_one_more_does_not():
    """A GPU just big enough for half a tiny run: the plan's largest micro-batch fits, one more does not."""
    cfg = config_from_dict({}, ["data.resolution=64", "train.batch_size=64", "train.activation_checkpointing=0"])
    peak8 = simulate_step(cfg, configured_setup(cfg, precision="fp32")).peak_bytes   # micro-batch 64
    gpu = 2.0 + 1.1 * (0.5 * peak8) / GIB       # usable: half the micro-batch-64 peak
    plan = plan_training(cfg, precision="fp32", settings=(), gpu_memory_gib=gpu)
    best = plan.configured.max_micro_batch
    assert plan.fits is False and 1 <= best < 64
    usable = usable_peak_gib(gpu) * GIB
    assert simulate_step(cfg, StepSetup("pretrain", best, precision="fp32")).peak_bytes <= usable
    assert simulate_step(cfg, StepSetup("pretrain", best + 1, precision="fp32")).peak_bytes > usable
    assert plan.configured.grad_accum_needed == grad_accum_for(64, best)
    assert "DOES NOT FIT" in format_plan(plan)


def test_grad_accum_divides_the_worker_batch():
    assert grad_accum_for(32, 20) == 2
    assert grad_accum_for(32, 32) == 1
    assert grad_accum_for(24, 7) == 4      # 24 / 4 = 6 <= 7 (5 does not divide 24)
    assert grad_accum_for(32, 0) is None


def test_shipped_512px_recipe_fits_an_80gib_gpu():
    """configs/cluster/pretrain.yaml at full size (vosr-0.5b, 512 px, bf16, DDP x 8, its micro-batch), planned with
    fake tensors (seconds of CPU, no memory): it fits the 80 GiB it declares."""
    cfg = load_config("configs/cluster/pretrain.yaml")
    plan = plan_training(cfg, settings=(), search=False)
    assert (plan.precision, plan.workers, plan.strategy, plan.gpu_memory_gib) == ("bf16", 8, "ddp", 80)
    assert plan.micro_batch == 16 and plan.fits is True
    by = plan.configured.by_category_gib
    assert by["parameters"] == pytest.approx(0.4856e9 * 4 / GIB, rel=0.02)    # 485.6M fp32 (docs/method.md s4)
    assert by["optimizer state"] == pytest.approx(2 * by["parameters"], rel=0.01)
    assert by["ddp buckets"] == by["parameters"] and by["activations"] > 10


def test_command_exits_1_when_the_config_does_not_fit(capsys):
    args = ["--set", "data.resolution=64", "--set", "train.batch_size=8", "--checkpointing", "",
            "--precision", "fp32"]
    assert main(args + ["--gpu-memory-gib", "2.01"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(args + ["--gpu-memory-gib", "8", "--json"]) == 0
    assert '"fits": true' in capsys.readouterr().out
    # the section other commands (vosr plan) show for a training config
    cfg = config_from_dict({}, ["data.resolution=64", "train.batch_size=8", "train.gpu_memory_gib=8"])
    fits, text = gpu_memory_section(cfg)
    assert fits is True and text.startswith("GPU memory plan: pretrain, tiny at 64 px")
