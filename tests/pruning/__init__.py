"""Tests of spap.pruning."""
