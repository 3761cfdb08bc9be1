"""The inference stages: greedy responses (generation), the top-k and advantage stores (inference),
and evaluation with its judges.
"""
