"""Trace-driven simulation of the placement policies (`gpu-extender simulate`)."""
