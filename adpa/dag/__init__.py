"""The stage graph as data: the student methods' entries (methods), their losses as term tables
(objectives), the registry of every stage (stages) and what a sweep retrains (sweeps).

Light imports: Snakemake reads these at parse time. Imports only adpa.core.
"""
