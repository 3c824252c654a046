"""Training: the loop shared by every task, its schedules, checkpoints and logging."""
