"""One module per ``cellwatch`` subcommand: each exposes ``add_parser(subparsers)`` and ``run(args)``."""
