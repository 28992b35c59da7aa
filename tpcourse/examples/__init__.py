"""Example student submissions for the course's assignments (used by the demo and the tests)."""
