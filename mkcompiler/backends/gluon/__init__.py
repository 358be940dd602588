"""The Gluon (warp-specialized, sm_90) backend: today its TMA weight streamer (stream.py)."""
