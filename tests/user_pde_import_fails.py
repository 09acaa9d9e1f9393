"""A user's PDE module that raises while it is imported (a missing setting, say)."""

import os

SCALE = float(os.environ["DSTEIN_TEST_PDE_SCALE"])  # not set: KeyError at import
