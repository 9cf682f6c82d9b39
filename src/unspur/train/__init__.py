"""The one training loop, its objectives and seeding."""
