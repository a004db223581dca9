"""Deciding on paper: the rung table and what each rung needs, the cost model, the ladder (the
next rung after an OOM), the planner (the fastest plan that fits) and the reading of an OOM's
figures. Pure: facts in, plans out; no torch module is touched here."""
