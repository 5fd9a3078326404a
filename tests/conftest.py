"""Shared test setup: never touch the network; one torch thread (test tensors are tiny,
and on a 2-core machine two threads contending with anything else run 10x slower)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch

torch.set_num_threads(1)
