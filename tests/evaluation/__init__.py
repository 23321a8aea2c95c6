"""Tests of spap.evaluation."""
