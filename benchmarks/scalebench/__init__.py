"""The parts of ``benchmarks/scale.py`` (its entry point), one concern per module."""
