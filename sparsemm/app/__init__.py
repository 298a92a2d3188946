"""The application layer: the CLI, evaluation, reports, plots, progress bars and the tiny model's trainer.

It may import every package; nothing imports it (tests/test_layers.py checks both).
"""
