"""Containers: records, bundles, shims, logs."""
