"""The AUP's rules as pure decisions (no I/O): see ``campaign`` for the e-mail rules."""
