"""accelerators package of cv-worker."""
