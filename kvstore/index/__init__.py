"""The index database: engine and pragmas, schema, byte accounting columns, shared row queries, and the read
queries as plain SQL with a sqlite3 reader for commands that only read (no SQLAlchemy at start-up)."""
