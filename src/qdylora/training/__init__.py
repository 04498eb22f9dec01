"""Training: settings, rank rules, losses, the loop, processes, the adapter file and the run directory."""
