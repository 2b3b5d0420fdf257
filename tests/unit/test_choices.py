"""The upscaling options are named once (vosr/choices.py); every place that accepts them takes exactly those."""

from __future__ import annotations

import dataclasses

import pytest

from vosr import choices


def test_colour_fixes_and_modes_match_their_implementations_and_the_config():
    from vosr.colorfix import COLOR_FIXES
    from vosr.config.inference import InferenceConfig
    from vosr.config.method import FlowConfig

    assert tuple(COLOR_FIXES) == choices.COLOR_FIXES
    fields = {f.name: f for f in dataclasses.fields(InferenceConfig)}
    assert fields["mode"].metadata["choices"] == choices.MODES
    assert fields["color_fix"].metadata["choices"] == choices.COLOR_FIXES
    assert {f.name: f for f in dataclasses.fields(FlowConfig)}["schedule"].metadata["choices"] == choices.SCHEDULES


def test_the_upscaler_and_the_endpoint_refuse_any_other_name():
    from inference.serve import ServeError, parse_query
    from jobkit.config import config_from_dict
    from vosr.upscaler import UpscaleOptions

    for mode in choices.MODES:
        UpscaleOptions(mode=mode).validate()
    with pytest.raises(ValueError, match="mode"):
        UpscaleOptions(mode="fewstep").validate()
    scfg = config_from_dict({}).serve
    assert parse_query({"mode": "multistep", "color_fix": "wavelet"}, scfg) == {"mode": "multistep",
                                                                               "color_fix": "wavelet"}
    for bad in ({"mode": "fewstep"}, {"color_fix": "histogram"}):
        with pytest.raises(ServeError) as exc:
            parse_query(bad, scfg)
        assert exc.value.status == 422 and next(iter(bad)) in str(exc.value)
