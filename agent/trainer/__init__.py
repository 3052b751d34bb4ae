"""Training offload: the build-system peer (``cv-worker trainer``) and the node's ``train`` job.

Nothing here imports torch at module level: the agent imports this package at start-up.
"""
