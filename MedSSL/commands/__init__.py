"""One module per ``medssl`` sub-command: ``add_parser(subparsers)`` registers it, ``args.run`` runs it."""
