"""ΔL Lab: loss aggregation for RLVR, taught with code you can run."""

__version__ = "0.1.0"
