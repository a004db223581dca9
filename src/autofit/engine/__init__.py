"""Running a call under a plan. Each object owns its state and alone changes it: the placement
(the plan in force, what is placed, the one-way ledger, the host copies), the course (the start
plan, its way up and back down), the measurements, preflight, recovery (a pure decision, then the
placement switches); the runtime builds them and runs the call loop; the stage wrappers retry a
component call in place and talk to the runtime through a small protocol."""
