"""Sub-commands of the ``collector`` console script (see ``collector.cli``)."""
