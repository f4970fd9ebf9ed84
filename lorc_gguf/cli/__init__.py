"""Every command line of lorc-gguf (console scripts in pyproject.toml; ``tools/*.py`` call the same
functions), with one error convention (``common``)."""
