"""`python -m graft.train`: the same as `graft-train`."""

from graft.train.cli import main

main()
