"""Fakes and fixtures' helpers that several test modules share (no test module imports another)."""
