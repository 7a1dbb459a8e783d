import os
import sys

# Idle OpenMP threads sleep instead of spinning (set before torch loads): on a busy 2-core machine
# spinning threads make torch several times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402

sys.exit(main())
