"""`python -m demo`: the main job on the embedded default (demo/chain.py)."""

import sys

from demo.chain import main

sys.argv[0] = "python -m demo"  # argparse's prog in the usage line (not "__main__.py")
raise SystemExit(main())
