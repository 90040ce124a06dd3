"""Session settings. Under pytest-xdist (``-n auto``) each worker takes its share of the CPU's
threads, so that the workers' tensor operations do not contend for the same cores."""

import os

import torch

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))
