"""Judging apart from student code (placeholder)."""
