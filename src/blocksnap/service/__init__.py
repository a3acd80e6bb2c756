"""Service layer: what a command does, run locally or by the pool's daemon."""
