"""Tests of spap.cli."""
