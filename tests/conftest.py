"""Test-session settings: one intra-op thread per test process.

The tests use tiny tensors, where thread start-up and contention cost more than they save;
on a 2-core machine one thread per process runs the suite several times faster.
"""
import torch

torch.set_num_threads(1)
