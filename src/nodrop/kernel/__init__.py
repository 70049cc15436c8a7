"""Seams to the kernel: ``SCM_RIGHTS``, ``bpf(2)`` and the socket-migration
capability probe."""
