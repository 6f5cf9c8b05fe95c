"""The ``metapl`` command line: ``cli`` (the parser and the subcommands' dispatch), ``inference`` (eval, predict),
``plot`` and ``demo``. Commands call ``metapl.engine``; nothing below imports them (see docs/architecture.md).
"""
