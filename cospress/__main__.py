"""``python -m cospress`` runs the command line (also what ``torchrun -m cospress`` uses)."""

from cospress.cli import main

main()
