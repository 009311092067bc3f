"""Training: the loop, the evaluation, and running a whole config into a run store."""
