"""Prefect flows that wrap :mod:`pipeline` entry points (orchestration only, no numerics)."""
