"""Turning image features into captions: beam search, greedy and sampling, n-gram blocking, the
decode settings and the numpy twin for ONNX. Open captions.py first (decode_features).
"""
