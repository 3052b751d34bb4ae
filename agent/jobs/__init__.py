"""Job types and the engine that runs them."""
