"""pgshard front end: listener, client sessions, protocol codec, CLI."""
