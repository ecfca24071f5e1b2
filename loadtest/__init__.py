"""Load test for mailguard: an upstream sink, a plain relay baseline and drivers.

Not part of the test suite: it prints figures and never asserts on speed.  See README.md.
"""
