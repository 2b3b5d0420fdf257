"""The named options of upscaling, defined once (torch-free, so the config schema, argument parsers and the HTTP
endpoint can import them): the sampler modes, time schedules and colour fixes. vosr/upscaler.py and
vosr/colorfix.py implement exactly these names (tests/unit/test_choices.py holds them to it)."""

MODES = ("onestep", "multistep")
SCHEDULES = ("linear", "cosine")
COLOR_FIXES = ("adain", "wavelet", "none")
# random streams of an upscale: "vosr" draws the posterior sample and the noise from two generators derived from the
# seed; "reference" draws both from one generator seeded with the seed, posterior first, on the model's device, as
# the authors' inference scripts do for the first image of a run (docs/method.md s8)
RNGS = ("vosr", "reference")
# 8-bit conversion: "round" once after the colour fix; "reference" truncates after decoding and again after the
# colour fix, as the authors' scripts do (ToPILImage twice)
QUANTIZE = ("round", "reference")
# inference.preset: the released models' benchmark settings (vosr/config/root.py INFERENCE_PRESETS)
INFERENCE_PRESETS = ("realsr", "screensr")
