"""Messages between front ends and engine cores: one module per direction, all msgspec, never pickle."""
