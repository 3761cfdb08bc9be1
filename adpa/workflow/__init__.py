"""What drives the stages: the schema-validated config and its docs, the key checks, the preflight,
the engine choice and launch commands, provenance (code hashes for Snakemake's params trigger).
"""
