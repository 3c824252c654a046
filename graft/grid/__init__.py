"""Grids: experiment files -> every M#D cell x seed -> tables and plots beside the paper's."""
