"""Backend connections to PostgreSQL and the pools that hold them. Never imports router or parser."""
