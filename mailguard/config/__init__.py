"""Configuration: the frozen schema (``schema``) and the TOML loader that validates it (``load``)."""
