"""testbed: QEMU-backed power-cut testbed for persistent-memory block software."""

__version__ = "0.1.0"
