"""Fault and soak tests."""
