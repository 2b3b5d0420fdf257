"""Request parsing and limits: the query options (types, static bounds and names checked by FastAPI; the bounds
taken from serve.* checked here, since FastAPI fixes its bounds at import and the config arrives with the
replica), the decoded image's caps, and the cost model.

Cost model (before any work): a request costs tiles x steps x guidance passes model evaluations (vosr.upscaler
.CostPlan; a tile larger than the default options' evaluation counts by its area ratio). Tiles are bounded by
serve.min_tile / serve.max_tile, the overlap by half a tile (vosr.tiling), and tiling is forced above
serve.force_tile_pixels upscaled pixels, so no query option costs more than serve.max_cost_ratio x the defaults.
"""

# No `from __future__ import annotations`: pydantic and FastAPI read the real annotations of UpscaleQuery.
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inference.serve.errors import ServeError
from vosr.choices import COLOR_FIXES, MODES


class UpscaleQuery(BaseModel):
    """The query options of POST /upscale and POST /, validated by FastAPI before the handler runs: types, the
    static bounds, the names of vosr.choices and no unknown option. The bounds read from serve.* are checked by
    query_overrides (FastAPI's bounds are fixed when this module is imported, the config is not)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal[MODES] | None = None
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=-20.0, le=20.0, allow_inf_nan=False)
    weak_strength: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    tile: int | None = Field(None, ge=0)
    tile_overlap: int | None = Field(None, ge=0)
    color_fix: Literal[COLOR_FIXES] | None = None


def option_errors(errors) -> str:
    """Pydantic's (FastAPI's) validation errors as one line naming each option, e.g. "steps='0': Input should be
    greater than or equal to 1"."""
    return "; ".join(f"{e['loc'][-1]}={e.get('input')!r}: {e['msg']}" for e in errors)


def query_overrides(query: UpscaleQuery, serve_cfg) -> dict[str, Any]:
    """The options sent, as UpscaleOptions overrides, within the config's bounds; raises ServeError(422)."""
    out = query.model_dump(exclude_none=True)
    tile, overlap, steps = out.get("tile", 0), out.get("tile_overlap", 0), out.get("steps", 1)
    if steps > serve_cfg.max_steps:
        raise ServeError(422, "bad_option", f"steps={steps} exceeds serve.max_steps ({serve_cfg.max_steps})")
    if tile and not serve_cfg.min_tile <= tile <= serve_cfg.max_tile:
        raise ServeError(422, "bad_option", f"tile={tile} must be 0 (off) or within [{serve_cfg.min_tile}, "
                         f"{serve_cfg.max_tile}] pixels")
    if overlap > (tile or serve_cfg.max_tile) // 2:
        raise ServeError(422, "bad_option", f"tile_overlap={overlap} exceeds half the tile "
                         f"({(tile or serve_cfg.max_tile) // 2})")
    if "tile" in out:
        out["tile_size"] = out.pop("tile")
    return out


def parse_query(params, serve_cfg) -> dict[str, Any]:
    """Raw query options (a mapping of strings) -> UpscaleOptions overrides, as the endpoint validates them."""
    try:
        query = UpscaleQuery.model_validate(dict(params))
    except ValidationError as exc:
        raise ServeError(422, "bad_option", option_errors(exc.errors())) from None
    return query_overrides(query, serve_cfg)


def decode_upload(data: bytes, serve_cfg):
    """Bytes -> RGB PIL image with the caps applied; raises ServeError(413/415/400)."""
    from vosr.imageio import NOT_IMAGE_REASONS, ImageDecodeError, decode_image

    if len(data) > serve_cfg.max_body_bytes:
        raise ServeError(413, "too_large", f"body of {len(data)} bytes exceeds {serve_cfg.max_body_bytes} bytes")
    try:
        return decode_image(data, max_pixels=serve_cfg.max_pixels)
    except ImageDecodeError as exc:
        if exc.reason == "too_many_pixels":
            raise ServeError(413, "too_many_pixels", f"image exceeds {serve_cfg.max_pixels} pixels "
                                                     f"({exc.detail})") from None
        if exc.reason in NOT_IMAGE_REASONS:
            raise ServeError(415, "not_an_image", f"the body is not a supported image ({exc.reason})") from None
        raise ServeError(400, "bad_image", f"the image could not be decoded ({exc.reason}: {exc.detail})") from None


def check_cost(plan, default_plan, serve_cfg) -> dict[str, Any]:
    """Refuse, before any work, a request costing more than serve.max_cost_ratio x the defaults on the same image
    (422) or more than serve.max_evaluations (413). Returns the numbers."""
    ref = default_plan.area
    cost, base = plan.cost(ref), default_plan.cost(ref)
    numbers = {"evaluations": plan.evaluations, "tiles": plan.tiles, "steps": plan.steps, "passes": plan.passes,
               "cost": round(cost, 2), "default_cost": round(base, 2), "ratio": round(cost / base, 3),
               "max_cost_ratio": serve_cfg.max_cost_ratio, "max_evaluations": serve_cfg.max_evaluations}
    where = (f"{plan.tiles} tiles x {plan.steps} steps x {plan.passes} passes = {plan.evaluations} evaluations"
             + (f" of {plan.area / ref:.2f}x the default's area" if plan.area > ref else ""))
    if cost > serve_cfg.max_evaluations:
        raise ServeError(413, "over_budget", f"{where}: cost {cost:.0f} exceeds the budget of "
                         f"{serve_cfg.max_evaluations} model evaluations per request", cost=numbers)
    if cost > serve_cfg.max_cost_ratio * base + 1e-9:
        raise ServeError(422, "too_costly", f"{where}: cost {cost:.0f} is {cost / base:.2f}x the default options' "
                         f"{base:.0f} on this image; the limit is {serve_cfg.max_cost_ratio}x", cost=numbers)
    return numbers


def page_options(upscaler, defaults, serve_cfg) -> dict[str, Any]:
    """Modes the loaded checkpoint runs (a student: one-step; a teacher: multi-step), their default steps, and the
    bounds the endpoint enforces (steps <= serve.max_steps, tiles within [min_tile, max_tile])."""
    mode = "onestep" if upscaler.is_student else "multistep"
    steps = upscaler.onestep_steps if upscaler.is_student else upscaler.multistep_steps
    return {"modes": {m: m == mode for m in MODES}, "mode": mode, "default_steps": min(steps, serve_cfg.max_steps),
            "max_steps": serve_cfg.max_steps, "min_tile": serve_cfg.min_tile, "max_tile": serve_cfg.max_tile,
            "seed": defaults.seed, "color_fix": defaults.color_fix}
