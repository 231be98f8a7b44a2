"""(being written)"""


def register(subparsers) -> None:  # replaced by the module's real commands
    pass
