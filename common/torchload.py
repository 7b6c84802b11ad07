"""Reading a user's .pt file: plain values and tensors only, never other pickled objects."""
from __future__ import annotations

import os
import warnings

import torch


def load_plain(path: str | os.PathLike, map_location="cpu"):
    """`torch.load(path, weights_only=True)`; raises pickle.UnpicklingError for anything else in the file."""
    with warnings.catch_warnings():  # torch's notes on a raw pickle's protocol are not the user's concern
        warnings.simplefilter("ignore")
        return torch.load(path, map_location=map_location, weights_only=True)
