"""promptfleet measured against its peers in one run: ``python -m bench.peers`` (see ``__main__``)."""
