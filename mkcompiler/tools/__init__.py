"""What a user runs beside compile(): the CLI, profiling, offline sm_90 compiles, the compile
cache, the demo, progress lines."""
