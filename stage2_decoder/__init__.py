"""Stage 2: decoder training from the feature cache, sweeps, and raw-image captioning.

`from stage2_decoder import Captioner` imports the API (and torch) on first use only, so importing the
package stays cheap (the ONNX captioner's CLI runs where torch is not installed).
"""
from __future__ import annotations

__all__ = ["Captioner"]


def __getattr__(name: str):
    if name == "Captioner":
        # imported on use: a module-level import would make an import circle
        from stage2_decoder.api import Captioner

        return Captioner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
