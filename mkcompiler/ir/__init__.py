"""The IR: the op graph (graph.py), the tile DAG (dag.py), the instruction queue and its field
layouts, settings. Imports nothing else of mkcompiler's."""
