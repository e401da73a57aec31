"""Stages: the I/O edge between the run directory and polca's tensor functions.

Each stage reads what earlier stages wrote, writes its own part of the run directory in blocks
marked done only once on disk, and skips what is already done.
"""
