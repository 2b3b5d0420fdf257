"""The named options of upscaling, defined once (torch-free, so the config schema, argument parsers and the HTTP
endpoint can import them): the sampler modes, time schedules and colour fixes. vosr/upscaler.py and
vosr/colorfix.py implement exactly these names (tests/test_choices.py holds them to it)."""

MODES = ("onestep", "multistep")
SCHEDULES = ("linear", "cosine")
COLOR_FIXES = ("adain", "wavelet", "none")
