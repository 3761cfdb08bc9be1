"""Tables, intervals, plots and model cards from the stages' outputs: summary, sweep_summary, stats,
model_card.
"""
