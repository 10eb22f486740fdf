"""The locator: a national index of which NHS trust holds which imaging studies."""

__version__ = "0.1.0"
