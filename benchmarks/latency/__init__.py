"""The reload latency benchmark's parts: rows, sampling, and the pure breakdown."""
