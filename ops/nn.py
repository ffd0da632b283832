"""lk3d.nn: drop-in modules (placeholder until the module layer lands)."""
