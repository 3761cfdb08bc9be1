"""adpa-workflow: ADPA (ICLR 2025) reproduction stages, runnable with or without Snakemake.

Subpackages in the order of the import graph (a module imports only its own layer and those before
it; tests/test_layout.py holds the order): core, dag (the stage graph as data: methods, stages),
inputs, modeling, training, infer, report, workflow; then cli (`python -m adpa`).
"""
