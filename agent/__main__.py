"""``python -m agent`` runs the ``sensormine-agent`` command line."""

from agent.cli import main

main()
