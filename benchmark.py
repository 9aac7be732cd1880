#!/usr/bin/env python3
"""Benchmark: encoder speed of every backend side by side (and, with --pipeline, decoding and the job). See --help."""
from iv2trt.bench.main import main
from iv2trt.cli import exit_with

if __name__ == "__main__":
    exit_with(main)
