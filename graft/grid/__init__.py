"""Grids: experiment files -> every M#D cell x seed -> tables and plots beside the paper's; and
the studies of one pair (static correction, tuning transfer, schedule trend)."""
