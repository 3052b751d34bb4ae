"""models package of cv-worker."""
