"""Tests of spap.adapters."""
