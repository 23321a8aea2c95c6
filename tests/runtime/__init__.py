"""Tests of spap.runtime."""
