"""The Triton backend: the persistent kernel's dispatcher (codegen.py), its tensor-parallel
parameters (codegen_tp.py, kernel_tp.py) and the interpreter support."""
