"""From a PyTorch model to the op graph: torch.export capture and lowering (capture.py),
Hugging Face decode-step wrappers (hf.py)."""
