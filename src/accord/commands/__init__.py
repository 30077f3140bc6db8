"""The ``accord`` subcommands, one module per command.

Each module is a thin argparse front end over library functions: ``add_arguments(parser)`` declares its flags and
``run(args) -> int`` turns them into calls of the library (imported inside ``run``, so that building the parser stays
cheap). :data:`accord.cli.COMMANDS` lists them with their one-line help.
"""
