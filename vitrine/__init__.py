"""vitrine: the command line that wires the core (indexer/) to its adapters."""

__version__ = "0.1.0"
