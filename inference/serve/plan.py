"""`vosr plan` entries of the endpoint (jobkit/plan.py): one replica's host memory, whatever the corpus."""

from __future__ import annotations


def plan_stages(cfg, images: int) -> list:
    """One model replica's peak: the model and encoders' weights (fp32 while loading), the request bodies it may
    hold (max_ongoing_requests x max_body_bytes) and one batch of the largest images at work (decoded input and x4
    float32 output, twice). `images` (the corpus) does not enter: a replica's unit of work is one batch."""
    from jobkit.plan import Proc, Stage, gib
    from pipelines.features.stages import ENCODER_WEIGHT_BYTES
    from vosr.model import count_parameters

    sc = cfg.serve
    weights = 4 * count_parameters(cfg)["student_params"] + ENCODER_WEIGHT_BYTES.get(cfg.autoencoder.name, 0) \
        + ENCODER_WEIGHT_BYTES.get(cfg.semantic.name, 0)
    bodies = sc.max_ongoing_requests * sc.max_body_bytes
    work = sc.max_batch_size * 2 * (12 * sc.max_pixels + 16 * sc.max_pixels * 3 * 4)
    peak = weights + bodies + work + (1 << 30)
    return [Stage("serve", [Proc("replica", peak, f"weights {gib(weights)} + {sc.max_ongoing_requests} bodies x "
                                                  f"{gib(sc.max_body_bytes)} + batch {sc.max_batch_size} x 2 x "
                                                  f"(input + x4 output) at max_pixels {sc.max_pixels:,} + 1 GiB",
                                 "gpu" if sc.replica_gpus else "cpu", gpus=float(sc.replica_gpus))],
                  note="per replica; independent of the corpus")]
