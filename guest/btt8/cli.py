"""The `btt8` command line."""


def main() -> int:
    return 0
