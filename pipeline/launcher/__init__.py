"""`kiln launch`'s launchers: each validates a multi-node job before anything starts, then runs its script
(scripts/, package data; the checkout's launch/ links to them). They receive the launched command's words
and, for a `kiln train`, its parsed RunConfig from pipeline/commands/launch.py; they never parse a command line."""
