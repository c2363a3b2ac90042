"""Small shared helpers: rank-aware logging, distributed set-up, the CPU compatibility layer."""
