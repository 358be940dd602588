"""Code generation from the instruction queue, one package per backend."""
