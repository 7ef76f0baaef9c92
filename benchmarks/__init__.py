"""Side-by-side benchmarks of rateguard and its peers: `python -m benchmarks.run` (`make bench`)."""
