"""`kiln launch`: validate a multi-node job before anything starts, then run the launch/ scripts."""
