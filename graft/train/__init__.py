"""Training: the loop shared by every task, its schedules, checkpoints and logging, and what a
run reads of an earlier grafted run (its recorded norms, replayed or as static multipliers)."""
