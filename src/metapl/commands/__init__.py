"""The ``metapl`` command line: ``cli`` (the parser and the subcommands' dispatch), ``inference`` (eval, predict),
``plot`` and ``demo``. Commands call the trainer (``metapl.config``, ``metapl.training``, ``metapl.rundir``,
``metapl.protocol``); nothing below imports them (see docs/architecture.md).
"""
