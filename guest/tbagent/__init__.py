"""Guest agent: workload and recover-and-dump, run inside the guest (stdlib only)."""
