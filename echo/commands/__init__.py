"""One module per ``echo-ssl`` sub-command: ``add_arguments(parser)`` and ``run(args) -> int``."""
