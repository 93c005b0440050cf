"""standby: event-driven, crash-consistent active/passive file replication."""

__version__ = "0.1.0"
