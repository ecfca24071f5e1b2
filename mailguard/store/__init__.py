"""The store: the only code that talks to Redis.  ``base`` is the interface, ``redis_store`` the
implementation, ``embedded`` the private redis-server child behind ``url = "embedded"``."""
