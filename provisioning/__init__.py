"""provisioning package of cv-worker."""
