"""Launching megakernels: buffers, inputs, launch and errors (megakernel.py), and models
segmented around ops that run eagerly (fallback.py)."""
