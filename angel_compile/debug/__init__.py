"""Pass-by-pass debugging: stage dumps, graph diffs and numerics against the reference."""
