"""The built-in container runtime: syscalls, mounts, namespaces, capabilities."""
