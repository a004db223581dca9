"""What autofit knows about the machine and the model: devices and their memory, the host, the
pipeline's components and what they weigh, compiled regions, the checkpoint on disk, and what
earlier runs learned (the plan cache). Reads the world; decides nothing."""
