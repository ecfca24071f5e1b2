"""Configuration: the frozen schema (``schema``) and the validating TOML loader (``load``)."""
