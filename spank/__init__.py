"""The Slurm SPANK plugin's Python half: site policy, planning, the per-node container."""
