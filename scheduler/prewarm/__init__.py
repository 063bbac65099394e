"""Predictive pre-warming in the extender: forecast each model's demand and keep warm capacity ahead of it."""
