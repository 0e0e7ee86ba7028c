"""ftlab: fine-tune language models and measure, and limit, what they forget."""

import os

# OpenMP threads that spin while waiting make torch 10-20x slower on a busy small CPU; let them sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
