"""A physics-based simulator of the voraus-AD pick-and-place cell (pinocchio rigid-body dynamics)."""
