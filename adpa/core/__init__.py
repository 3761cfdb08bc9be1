"""The ground floor: errors, results/ paths, publishing and manifests (artifacts), metric rows.

Imports nothing else of adpa.
"""
