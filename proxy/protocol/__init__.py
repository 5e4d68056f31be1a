"""The PostgreSQL v3 wire protocol as pure functions over bytes (sans-IO): nothing here touches a socket."""
