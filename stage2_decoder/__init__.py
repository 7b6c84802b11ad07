"""Stage 2: decoder training from the feature cache, sweeps, and raw-image captioning."""
