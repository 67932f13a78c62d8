"""The reliability suite: crash injection, concurrency, corruption, disk full, bad input, stateful."""
