"""The contract every stage shares, torch-free: ModelSpec and its presets (`spec`), the artifact manifest
(`manifest`), tokenizer files (`tokenizer`), typed errors (`errors`), file helpers (`files`), live progress
(`progress`) and the tolerance table (`tolerances`).

reference, export, runtime and serve import this package; it imports none of them (tests/test_layers.py holds
every package to the imports it may make).
"""
