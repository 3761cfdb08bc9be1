"""adpa-workflow: ADPA (ICLR 2025) reproduction stages, runnable with or without Snakemake."""
