"""One module per ``nodrop`` subcommand; each has ``register(subparsers)``."""
