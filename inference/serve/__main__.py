"""`python -m inference.serve ...`: the serve job's command line (inference/serve/cli.py)."""

import sys

from inference.serve.cli import main

sys.argv[0] = "python -m inference.serve"   # the name --help and usage errors show
raise SystemExit(main())
