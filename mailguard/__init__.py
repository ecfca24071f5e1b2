"""mailguard: an outbound mail gate that enforces a hosting provider's Acceptable Use Policy."""

__version__ = "0.1.0"
