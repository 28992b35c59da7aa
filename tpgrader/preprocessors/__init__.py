"""nbgrader preprocessors of the course, one per file (plugged in by tpgrader.configure)."""
