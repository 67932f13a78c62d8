"""The index database: engine and pragmas, schema, byte accounting columns, shared row queries."""
