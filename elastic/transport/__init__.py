"""Transport security shared by every process: authenticated, encrypted ZMQ over TCP (security.py)."""
