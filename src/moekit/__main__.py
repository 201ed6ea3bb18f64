"""``python -m moekit ...`` is the ``moekit`` command (and what ``torchrun ... -m moekit profile ...`` runs)."""

from moekit.cli import main

main()
