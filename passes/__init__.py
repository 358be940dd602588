"""Compiler passes: pure functions, run in the order `pipeline.PIPELINE` lists them."""
