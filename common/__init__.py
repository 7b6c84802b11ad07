"""Code shared by both stages: tokenizer, vocabulary, caption datasets, backbones, cache format."""
