"""rfpn.layers: pure-PyTorch layers (no Detectron2), usable on their own.

    from rfpn.layers import RNNPool
    pool = RNNPool(3, patch_size=8, stride=4, hidden1=16, hidden2=16, padding="same")
    y = pool(x)              # training: every patch at once
    y = pool.stream(x)       # inference: a row of patches at a time, same result
"""
from .rnnpool import CELLS, FastGRNNCell, GRUCell, RNNPool

__all__ = ["CELLS", "FastGRNNCell", "GRUCell", "RNNPool"]
