"""Serving a trained decoder: the web app, the request batcher, the page, the ONNX export and
its torch-free captioner. Open app.py first (create_app).
"""
