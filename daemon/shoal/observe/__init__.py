"""What an operator sees: the recorder of completed pull API answers, the facts of `/status.json`,
the `/status` page and the `shoal status` command."""
