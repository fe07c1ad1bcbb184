"""``python -m factory.cli`` (what ``torchrun -m factory.cli train ...`` runs)."""

from factory.cli import main

main()
