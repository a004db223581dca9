"""Running a call under a plan: the runtime and its state, the stage wrappers that retry a
component call in place, the plan switch and its rollback, per-stage moves, recovery after an
OOM, the way back down, what is measured and remembered."""
