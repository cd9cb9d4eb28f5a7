"""The per-container monitor process (the shim) and its wire protocol."""
