"""Evaluation at several ranks: the sweep, generation and answer scoring."""
