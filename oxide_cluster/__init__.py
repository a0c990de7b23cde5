"""oxide-cluster: a Twisted agent that pools hosts for running CI commands."""

__version__ = "0.1.0"
