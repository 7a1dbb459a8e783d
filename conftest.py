# Tests and nbval runs are headless: widgets draw static figures instead of waiting for a user.
import os

os.environ.setdefault("LESSONS_HEADLESS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep, not spin
