"""Tests of spap.io."""
