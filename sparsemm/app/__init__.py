"""The application layer: the CLI, evaluation, reports, plots and progress bars.

It may import every package; nothing imports it (tests/test_layers.py checks both).
"""
