"""Fingerprint benchmark: a labelled corpus from real text, mailguard vs fuzzy-hash baselines.

Not part of the test suite: it prints figures and never asserts on speed.  Run it as
``python -m loadtest.fingerprint``; see README.md.
"""
