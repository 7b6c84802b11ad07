"""Training the decoder from a feature cache: settings, data, epochs, SCST, checkpoints, resume.
Open loop.py first (train(cfg), the hand-written loop); config.py holds TrainConfig.
"""
