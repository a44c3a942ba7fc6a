"""BTT8: an alternative Block Translation Table for persistent memory (stdlib + ctypes)."""
