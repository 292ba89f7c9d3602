"""SIF images started unprivileged: facts -> ContainerPlan -> executor."""
