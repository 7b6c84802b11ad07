"""What a person reads: caption metrics, evaluation reports, the HTML gallery, training curves
and caption figures. Open evaluation.py first (evaluate_captions).
"""
