"""methodic-tui: the operator's dashboard for methodic uploads (and its headless twin)."""
