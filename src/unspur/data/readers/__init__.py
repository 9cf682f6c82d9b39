"""Built-in readers; importing this package registers them all."""
