"""``python -m stillroom`` (and ``torchrun -m stillroom distill ...``)."""

from stillroom.cli import main

main()
