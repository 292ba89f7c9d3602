"""Launchers: `apptainer-mpirun` / `rankwire run` (local PMI server or srun delegation)."""
