"""The run folder, one module per file and format: ``layout`` (the file names, ``config.yaml``, ``summary.json``,
``split.json``, the checks before a run writes), ``checkpoint`` (the checkpoint format, atomic saves, restore), ``lock``
(one writer per folder), ``result`` (the model a run hands back), ``rebuild`` (a network rebuilt from a checkpoint)
and ``export_format`` (``metapl export``'s files)."""
